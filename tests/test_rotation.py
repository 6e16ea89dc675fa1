"""Issue 28, classes 3 and 4: a checkpoint save killed between any two of its filesystem steps, and a torn last
line in the training log, leave a run folder that the same command resumes to the uninterrupted result."""

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import STEPS, assert_same_weights, train_args, weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lidr.harness.training
from lidr.harness.training import complete_checkpoint, forget_steps_after, latest_checkpoint, remove_checkpoint

MUTATIONS = ("mkdir", "rename", "replace", "link", "unlink", "rmdir")  # what changes a folder (shutil.rmtree too)


class Killed(BaseException):
    """SIGKILL, as far as the files can tell."""


@contextmanager
def killed_after(k: int, calls: list):
    """os's calls that change the filesystem go through until k have; from then on each raises Killed
    (the process is gone: nothing after the kill reaches the disk)."""
    real = {name: getattr(os, name) for name in MUTATIONS}

    def counted(name):
        def call(*args, **kwargs):
            calls.append((name, args))
            if len(calls) > k:
                raise Killed(name, args)
            return real[name](*args, **kwargs)

        return call

    with mock.patch.multiple(os, **{name: counted(name) for name in MUTATIONS}):
        yield


def fake_save(out: Path, step: int):
    """save_checkpoint on one rank, a shard file standing for torch.distributed.checkpoint's files."""
    tmp = out / "checkpoint.tmp"
    remove_checkpoint(tmp)
    tmp.mkdir(parents=True)
    (tmp / "shard").write_text(f"step {step}")
    complete_checkpoint(out, {"step": step})


def resume_step(out: Path) -> int:
    """The step a rerun resumes from; the checkpoint it resumes from must be whole and one save's."""
    folder = latest_checkpoint(out)
    if folder is None:
        return 0
    step = torch.load(folder / "trainer.pt")["step"]
    assert (folder / "shard").read_text() == f"step {step}"
    return step


def state(out: Path) -> dict:
    """The files of OUT by path (trainer.pt by the step it holds: torch.save's bytes are not reproducible)."""
    return {str(p.relative_to(out)): torch.load(p)["step"] if p.name == "trainer.pt" else p.read_bytes()
            for p in sorted(out.rglob("*")) if p.is_file()}


def ops_of_a_save(tmp_path: Path) -> int:
    out = tmp_path / "counted"
    out.mkdir()
    fake_save(out, 2)
    calls = []
    with killed_after(10**9, calls):
        fake_save(out, 4)
    return len(calls)


# -----------------------------------------------------------------------------
# 3. checkpoint rotation


def test_a_save_killed_after_any_number_of_steps_resumes_to_the_uninterrupted_end(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    for step in (2, 4, 6):
        fake_save(whole, step)
    n_ops = ops_of_a_save(tmp_path)
    assert n_ops >= 6  # the build, trainer.pt, two renames, the old checkpoint's removal
    for k in range(n_ops):
        out = tmp_path / f"killed{k}"
        out.mkdir()
        (out / "notes.txt").write_text("the user's")
        fake_save(out, 2)
        with pytest.raises(Killed), killed_after(k, []):
            fake_save(out, 4)
        start = resume_step(out)
        assert start in (2, 4), k
        for step in (4, 6):  # the rerun: trains from the checkpoint found, saves at the next steps
            if step > start:
                fake_save(out, step)
        assert state(out) == {**state(whole), "notes.txt": b"the user's"}, k


def test_a_second_kill_while_recovering_from_the_first_is_recovered_too(tmp_path):
    n_ops = ops_of_a_save(tmp_path)
    for first in range(n_ops):
        for second in range(n_ops):
            out = tmp_path / f"killed{first}-{second}"
            out.mkdir()
            fake_save(out, 2)
            with pytest.raises(Killed), killed_after(first, []):
                fake_save(out, 4)
            start = resume_step(out)
            with pytest.raises(Killed), killed_after(second, []):
                fake_save(out, start + 2)
            assert resume_step(out) in (start, start + 2)
            fake_save(out, resume_step(out) + 2)
            assert set(state(out)) == {"checkpoint/shard", "checkpoint/trainer.pt"}


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(kills=st.lists(st.one_of(st.none(), st.integers(0, 14)), min_size=1, max_size=6))
def test_saves_killed_anywhere_in_any_sequence_never_lose_a_whole_checkpoint(kills):
    """A run's saves, each either whole (None) or killed after k filesystem steps, each rerun resuming
    from the checkpoint it finds: that one is always whole, the one before the save or the save's
    own (the save's own once it returned), and the next save always goes through; the user's files
    are never touched."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "notes.txt").write_text("the user's")
        (out / "checkpoint.mine").mkdir()
        for kill_at in kills:
            before = resume_step(out)
            try:
                with killed_after(10**9 if kill_at is None else kill_at, []):
                    fake_save(out, before + 2)
                assert resume_step(out) == before + 2
            except Killed:
                assert resume_step(out) in (before, before + 2)
        fake_save(out, resume_step(out) + 2)
        assert set(state(out)) == {"checkpoint/shard", "checkpoint/trainer.pt", "notes.txt"}
        assert (out / "checkpoint.mine").is_dir()


@pytest.mark.slow
# a save after the first changes the filesystem 11 times: killed with its build incomplete (2), complete (3),
# between its renames (4), after them (5), with the old checkpoint half removed (7) or emptied (10); the
# rotation alone is killed after every number of steps above, without training
@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 10])
def test_training_killed_at_any_step_of_a_save_then_rerun_gives_the_uninterrupted_weights(k, one_process, tiny_dir,
                                                                                           data, tmp_path, monkeypatch):
    """The second save (step 2) killed after k of its filesystem calls, and a torn line left at the end
    of the log: the rerun, which saves at steps 3 and 4, finishes with the uninterrupted run's weights."""
    from lidr.cli.train import main

    out = tmp_path / "run"
    args = train_args(tiny_dir, data, out, "--batch-size", "2", "--grad-accum", "2", "--save-every", "1")
    real_save, saves, calls = lidr.harness.training.save_checkpoint, [], []

    def save_killed_after_k(*a, **kw):
        saves.append(1)
        if len(saves) != 2:
            return real_save(*a, **kw)
        with killed_after(k, calls):
            return real_save(*a, **kw)

    monkeypatch.setattr(lidr.harness.training, "save_checkpoint", save_killed_after_k)
    with pytest.raises(BaseException) as killed:  # torch.distributed.checkpoint wraps what it catches
        main(args)
    assert len(calls) > k, killed.value  # killed where meant
    monkeypatch.setattr(lidr.harness.training, "save_checkpoint", real_save)
    with open(out / "log.jsonl", "a") as log:
        log.write('{"step": 3, "loss": 0.6')  # a line torn by the kill
    main(args)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == list(
        range(1, STEPS + 1))
    assert_same_weights(weights(out), weights(one_process), atol=1e-6)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


# -----------------------------------------------------------------------------
# 4. a torn last line of the training log


def log_of(*steps) -> str:
    return "".join(json.dumps({"step": step, "loss": 0.5}) + "\n" for step in steps)


def test_a_torn_last_line_of_the_log_is_cut_saying_so_and_later_steps_forgotten(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    for torn in (b'{"step": 4, "lo', b'{"step": 4, "loss": 0.5', b"{", '{"step": 4, "text": "\xe9'.encode()[:-1]):
        log.write_bytes(log_of(1, 2, 3).encode() + torn)  # the last: a character cut in two
        forget_steps_after(log, 2)
        assert log.read_text() == log_of(1, 2)
        assert f"{log}:4: cut a torn last line" in capsys.readouterr().err
    log.write_text(log_of(1, 2, 3).rstrip("\n"))  # a whole last line without its newline: kept, and ended
    forget_steps_after(log, 3)
    assert log.read_text() == log_of(1, 2, 3)


def test_a_torn_line_before_the_last_is_refused_naming_the_file_and_line(tmp_path):
    log = tmp_path / "log.jsonl"
    text = log_of(1) + '{"step": 2, "lo\n' + log_of(3)
    log.write_text(text)
    with pytest.raises(SystemExit, match=rf"{log}:2: corrupt line before the last one"):
        forget_steps_after(log, 3)
    log.write_text(log_of(1) + '{"loss": 0.5}\n')
    with pytest.raises(SystemExit, match=rf"{log}: record 2 has no whole-number 'step'"):
        forget_steps_after(log, 3)
    assert log.read_text() == log_of(1) + '{"loss": 0.5}\n'
