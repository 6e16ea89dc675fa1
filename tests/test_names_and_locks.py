"""Issue 28, classes 1, 2 and 5: an output's name is text, never a pattern; a lock that no process holds
is taken over, one that may be held is refused with the file to delete; a cleanup deletes only what a
record proves lidr wrote, says each removal, and leaves look-alikes as they are."""

import errno
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import dead_pid, write_jsonl

import lidr.harness.outputs
from lidr.harness.outputs import ResumableWriter, hold_lock, lock_path, record_output, record_path, remove_own_output
from lidr.harness.sampled import GENERATE, merge

# every character that a glob or a regular expression reads as more than itself
SPECIAL = "[]*?{}+().^$|\\"
NAMES = [f"a{c}b.jsonl" for c in SPECIAL] + ["[ab].jsonl", "*.jsonl", "?.jsonl", "a.b.jsonl", ".jsonl"]


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def row_line(key, text) -> str:
    return json.dumps({"id": key, "text": text}) + "\n"


def neighbours(name: str) -> list[str]:
    """Names of files that are not OUT's partial files, though a glob, a regular expression or a prefix
    built from OUT's name would take them for some: other outputs' partial files and the user's."""
    return [f"{name}.rank0.other.jsonl.rank0.partial",  # the partial file of another output, OUT.rank0.other.jsonl
            f"{name}.rankX.partial", f"{name}.rank٣.partial", f"{name}.rank1.partial.bak",
            "a.jsonl.rank0.partial", "aXb.jsonl.rank0.partial", "x.jsonl.rank0.partial"]


# -----------------------------------------------------------------------------
# 1. names are text


@pytest.mark.parametrize("name", NAMES)
def test_an_output_merges_its_own_partial_files_whatever_its_name_and_no_others(tmp_path, name):
    out = tmp_path / name
    (tmp_path / f"{name}.rank0.partial").write_text(row_line(1, "one"))
    (tmp_path / f"{name}.rank1.partial").write_text(row_line(2, "two"))
    for other in neighbours(name):
        (tmp_path / other).write_text(row_line(3, f"not {name}'s"))
    others = {other: (tmp_path / other).read_bytes() for other in neighbours(name)}
    rows = merge(out, "id", {"1": 0, "2": 1, "3": 2})
    assert rows == [{"id": 1, "text": "one"}, {"id": 2, "text": "two"}]
    assert out.read_text() == row_line(1, "one") + row_line(2, "two")
    assert not (tmp_path / f"{name}.rank0.partial").exists() and not (tmp_path / f"{name}.rank1.partial").exists()
    assert {other: (tmp_path / other).read_bytes() for other in others} == others


@pytest.mark.parametrize("name", NAMES)
def test_removing_an_output_takes_its_own_files_whatever_its_name_and_leaves_look_alikes(tmp_path, name, sleeper):
    out = tmp_path / name
    out.write_text(row_line(1, "one"))
    record_output(out, GENERATE, {"v": 1})
    own = [record_path(out), tmp_path / f"{name}.rank0.partial", tmp_path / f"{name}.rank12.partial",
           tmp_path / f"{name}.tmp{dead_pid()}"]
    for path in own[1:]:
        path.write_text(row_line(2, "two"))
    look_alikes = [*neighbours(name), f"{name}.tmp", f"{name}.tmpl", f"{name}.tmp-1", f"{name}.tmp12x",
                   f"{name}.tmp{sleeper}"]  # the last: a live process's temporary
    for other in look_alikes:
        (tmp_path / other).write_text("the user's, or another process's\n")
    (tmp_path / f"{name}.tmp-dir").mkdir()
    (tmp_path / f"{name}.tmp-dir" / "keep.txt").write_text("mine")
    before = files_of(tmp_path)
    removed = remove_own_output(out, GENERATE)
    assert sorted(map(str, removed)) == sorted(map(str, [out, *own]))  # each removal listed
    after = files_of(tmp_path)
    gone = {str(p.relative_to(tmp_path)) for p in [out, *own]}
    assert after == {k: v for k, v in before.items() if k not in gone}


@pytest.mark.slow
def test_a_generation_resumed_under_a_pattern_name_merges_its_rows_and_leaves_a_neighbours(tiny_dir, tmp_path):
    from lidr import settings
    from lidr.harness.sampled import Engine, generate_file

    prompts = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "instruction": f"Say {i}"} for i in range(3)])
    decoding = replace(settings.ANSWERS, max_new_tokens=2)
    engine = Engine(tiny_dir, device="cpu")
    whole = generate_file(engine, prompts, tmp_path / "whole.jsonl", decoding)
    name = "r[1]*?{a}+(b).^$|\\.jsonl"
    out, neighbour = tmp_path / name, tmp_path / f"{name}.rank0.x.jsonl"
    # both interrupted: one row each in their rank 0 partial file, the rest to do
    for target, row in ((out, whole[0]), (neighbour, {**whole[1], "response": "the neighbour's"})):
        generate_file(engine, prompts, target, decoding)  # records it, as the interrupted run did
        target.unlink()
        target.with_name(target.name + ".rank0.partial").write_text(json.dumps(row) + "\n")
    neighbours_partial = neighbour.with_name(neighbour.name + ".rank0.partial").read_bytes()
    assert generate_file(engine, prompts, out, decoding) == whole
    assert neighbour.with_name(neighbour.name + ".rank0.partial").read_bytes() == neighbours_partial
    rows = generate_file(engine, prompts, neighbour, decoding)
    assert rows[1]["response"] == "the neighbour's" and [rows[0], rows[2]] == [whole[0], whole[2]]


# -----------------------------------------------------------------------------
# 2. locks


def lock_of(pid: int, **fields) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "command": "lidr.cli.pairs", **fields})


def age(path: Path, seconds: float):
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.parametrize("text", ["", "{", '{"pid": 12', '"a string"', '{"pid": "x"}', "\x00\x00\x00"])
def test_an_empty_or_unreadable_lock_older_than_a_few_seconds_is_taken_over(tmp_path, text):
    out = tmp_path / "out.jsonl"
    lock_path(out).write_text(text)
    age(lock_path(out), 60)  # its writer died between creating it and filling it
    with hold_lock(out, "test"):
        holder = json.loads(lock_path(out).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "test"
    assert not lock_path(out).exists()


def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path, sleeper):
    out = tmp_path / "out.jsonl"
    with hold_lock(out, "probe"):  # the record this lidr writes: pid, host, boot and start of the process
        mine = json.loads(lock_path(out).read_text())
    # the holder was killed; its pid now names the sleeper, a process that started after it
    lock_path(out).write_text(json.dumps({**mine, "pid": sleeper}))
    with hold_lock(out, "test"):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    # an older lidr's lock (no start time) written before the process that now has its pid started
    lock_path(out).write_text(lock_of(sleeper))
    age(lock_path(out), 60)
    with hold_lock(out, "test"):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    # an older lidr's lock naming a process that is not Python at all
    not_python = subprocess.Popen(["sleep", "60"])
    try:  # Popen returns once the child has exec'd: its command line is already `sleep`
        lock_path(out).write_text(lock_of(not_python.pid))
        with hold_lock(out, "test"):
            assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    finally:
        not_python.kill()
        not_python.wait()
    # a lock from before the host rebooted: no process of this boot holds it
    lock_path(out).write_text(json.dumps({**mine, "pid": sleeper, "boot_id": "another-boot"}))
    with hold_lock(out, "test"):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()


def test_a_live_holder_is_refused_naming_the_process_and_the_file_to_delete(tmp_path):
    out = tmp_path / "out.jsonl"
    code = "import sys, time; from lidr.harness.outputs import hold_lock; hold_lock(sys.argv[1], 'holder'); " \
           "print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as refused:
            hold_lock(out, "test")
        assert f"out.jsonl: in use by process {proc.pid} on this host (holder), running `{sys.executable} -c " \
               f"import sys" in str(refused.value)  # what that process is, seen from here, not only what the lock says
        assert f"kill {proc.pid}" in str(refused.value) and f"delete {lock_path(out)}" in str(refused.value)
        lock_path(out).write_text(json.dumps({**json.loads(lock_path(out).read_text()), "host": "node-7"}))
        with pytest.raises(SystemExit, match=rf"in use by process {proc.pid} on node-7 .*check on node-7 .*"
                                             rf"delete {lock_path(out)}"):
            hold_lock(out, "test")
        assert json.loads(lock_path(out).read_text())["host"] == "node-7"  # another host's lock: never broken
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_is_never_left_empty_when_writing_its_record_fails(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:  # the disk fills at the moment the holder's record is written
        patch.setattr(lidr.harness.outputs.json, "dump", disk_full)
        patch.setattr(lidr.harness.outputs.os, "fsync", disk_full)
        with pytest.raises(OSError):
            hold_lock(out, "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock, and no temporary of one
    with hold_lock(out, "test"):  # the next run is not blocked
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()


def test_where_the_filesystem_has_no_hard_links_the_lock_is_still_taken_and_released(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(lidr.harness.outputs.os, "link", no_links)
    out = tmp_path / "out.jsonl"
    with hold_lock(out, "test"):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_lock_that_a_reader_finds_is_never_empty(tmp_path):
    """Processes take and release one lock in a loop while this one reads it: every read that finds
    the file finds a whole record (creating and filling it are one step)."""
    out = tmp_path / "out.jsonl"
    code = ("import sys, time; from lidr.harness.outputs import hold_lock\nend = time.time() + 3\n"
            "while time.time() < end:\n    try:\n        hold_lock(sys.argv[1], 'race').release()\n"
            "    except SystemExit:\n        pass\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)]) for _ in range(2)]
    seen, empty = 0, 0
    try:
        while any(proc.poll() is None for proc in procs):
            try:
                text = lock_path(out).read_text()
            except FileNotFoundError:
                continue
            seen += 1
            empty += not text
    finally:
        for proc in procs:
            proc.wait()
    assert seen > 0 and empty == 0


# -----------------------------------------------------------------------------
# 4. a torn last line is cut, and the cut said


def test_a_resumable_writer_says_what_it_cut(tmp_path, capsys):
    path = tmp_path / "out.jsonl"
    path.write_text(row_line(1, "one") + '{"id": 2, "te')
    with ResumableWriter(path, "id") as writer:
        assert writer.done == {"1"}
    assert path.read_text() == row_line(1, "one")
    err = capsys.readouterr().err
    assert f"{path}:2: cut a torn last line" in err and '{"id": 2, "te' in err


# -----------------------------------------------------------------------------
# 5. --redo-from deletes only what a record proves lidr wrote, and says so


def test_redo_from_removes_what_records_prove_lists_each_removal_and_leaves_look_alikes(tiny_dir, tmp_path, capsys,
                                                                                           sleeper):
    from lidr import settings
    from lidr.harness.stages import plan, stage_identities, write_marker
    from lidr.harness.training import MADE_BY as TRAIN
    from lidr.iterate import Recipe

    prompts = tmp_path / "prompts"
    for lang in ("en", "fr"):
        write_jsonl(prompts / f"{lang}.jsonl", [{"id": "1", "instruction": "Q"}])
    recipe = Recipe(langs=("fr",), answers=replace(settings.ANSWERS, max_new_tokens=2))
    work, folder = tmp_path / "work", tmp_path / "work" / "iter1"
    write_marker(folder, "generate", stage_identities(tiny_dir, prompts, recipe, 1)["generate"])
    generated = write_jsonl(folder / "generate" / "en.jsonl", [{"id": "1", "response": "old"}])
    record_output(generated, GENERATE, {"old": True})
    own = [generated, record_path(generated), folder / "generate" / f"en.jsonl.tmp{dead_pid()}",
           folder / "generate" / "en.jsonl.rank1.partial"]
    for path in own[2:]:
        path.write_text(row_line(1, "a killed run's"))
    generate_look_alikes = ["en.jsonl.tmp", "en.jsonl.tmpl", "en.jsonl.tmp-old", f"en.jsonl.tmp{sleeper}",
                            "en.jsonl.rank1.partial.bak", "en.jsonl.rankX.partial", "notes.jsonl"]
    for name in generate_look_alikes:
        (folder / "generate" / name).write_text("the user's\n")
    train = folder / "train"
    (train / "model").mkdir(parents=True)
    (train / "model" / "config.json").write_text("{}")
    (train / "log.jsonl").write_text('{"step": 1}\n')
    (train / "checkpoint.old").mkdir()
    (train / "notes.txt").write_text("the user's notes about this run\n")  # in the run folder, not the trainer's
    (train / "checkpoint.mine").mkdir()
    record_output(train, TRAIN, {"old": True})
    own += [train / "model", train / "log.jsonl", train / "checkpoint.old", record_path(train)]
    write_marker(folder, "pairs", {"old": True})
    own += [folder / "done" / "generate", folder / "done" / "pairs"]
    before = files_of(tmp_path)
    other = replace(recipe, answers=replace(recipe.answers, max_new_tokens=3))
    plan(tiny_dir, [prompts], work, other, 1, 1, redo_from="generate")
    printed = capsys.readouterr().out
    gone = {str(p.relative_to(tmp_path)) for p in own} | {"work/iter1/train/model/config.json"}
    assert files_of(tmp_path) == {k: v for k, v in before.items() if k not in gone}
    for path in own:
        assert f"removed {path}\n" in printed, path
    assert (train / "checkpoint.mine").is_dir() and not (train / "model").exists()
    assert not (train / "checkpoint.old").exists()
