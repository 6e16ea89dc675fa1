"""The resumable JSONL layer (lidr/harness/outputs.py): killed anywhere, torn anywhere, resumed; and outputs
bound to what they were made from."""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lidr.harness.outputs import (
    ResumableWriter, check_output, file_identity, lock_path, read_records, record_output, record_path,
    write_json_atomic,
)
from lidr.harness.stage_files import PAIRS, SDRRL

# texts with what breaks line-based readers: newlines, U+2028, NEL, quotes, backslashes, emoji
TEXT = st.text(alphabet=st.sampled_from(list("ab \n\t\"\\{}[]é日\u2028\u0085\x1c🍎")), max_size=12)
KEYS = st.lists(st.one_of(st.integers(0, 50), st.text(alphabet="xyz0123", min_size=1, max_size=3)),
                min_size=1, max_size=12, unique_by=str)
# one interrupted session: how many rows it writes, then how many bytes of the next row's line get out
SESSIONS = st.lists(st.tuples(st.integers(0, 4), st.floats(0.0, 1.0)), max_size=5)


def line_of(row: dict) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode()


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=KEYS, texts=st.lists(TEXT, min_size=12, max_size=12), sessions=SESSIONS)
def test_killed_and_torn_anywhere_then_resumed_equals_an_uninterrupted_run(keys, texts, sessions):
    rows = [{"key": k, "text": t} for k, t in zip(keys, texts)]
    with tempfile.TemporaryDirectory() as tmp:
        whole, resumed = Path(tmp) / "whole.jsonl", Path(tmp) / "resumed.jsonl"
        with ResumableWriter(whole, "key") as writer:
            for row in rows:
                writer.write(row)

        for n_rows, torn_share in sessions:
            writer = ResumableWriter(resumed, "key")
            todo = [r for r in rows if str(r["key"]) not in writer.done]
            for row in todo[:n_rows]:
                writer.write(row)
            writer.file.close()  # killed: no close(), no fsync; every written row was flushed
            committed = resumed.read_bytes() if resumed.exists() else b""
            rest = todo[n_rows:]
            if rest:  # killed mid-write: part of the next row's line reached the file
                line = line_of(rest[0])
                with open(resumed, "ab") as f:
                    f.write(line[:round(torn_share * len(line))])
            ResumableWriter(resumed, "key").close()  # resume: reads, cuts a torn tail only
            assert resumed.read_bytes()[:len(committed)] == committed  # nothing before the tear changed

        with ResumableWriter(resumed, "key") as writer:
            for row in rows:
                if str(row["key"]) not in writer.done:
                    writer.write(row)
        assert resumed.read_bytes() == whole.read_bytes()
        read, bad = read_records(resumed)
        assert bad == [] and [row for _, row in read] == rows  # each key exactly once, in order


def test_a_complete_last_row_without_its_newline_is_a_row(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(line_of({"key": 1, "text": "a"}) + line_of({"key": "2", "text": "b"}).rstrip(b"\n"))
    with ResumableWriter(path, "key") as writer:
        assert writer.done == {"1", "2"} and [r["text"] for r in writer.rows] == ["a", "b"]
        writer.write({"key": 3, "text": "c"})
        with pytest.raises(ValueError, match="key=2 is already written"):  # ids compared as text
            writer.write({"key": 2, "text": "again"})
    assert read_records(path)[0] == [(1, {"key": 1, "text": "a"}), (2, {"key": "2", "text": "b"}),
                                      (3, {"key": 3, "text": "c"})]


def test_a_json_list_file_is_refused_and_left_as_it_is(tmp_path):
    path = tmp_path / "out.jsonl"
    for text in ('[{"key": 1}, {"key": 2}]', '[{"key": 1}, {"key": 2}]\n', '[\n  {"key": 1}\n]\n'):
        path.write_text(text)
        with pytest.raises(SystemExit, match=rf"{path}:1: (not a JSON object|corrupt line)"):
            ResumableWriter(path, "key")
        assert path.read_text() == text


def test_rows_without_the_key_are_refused(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"id": 1}\n')
    with pytest.raises(SystemExit, match=r"other\.jsonl: row 1 has no 'key'"):
        ResumableWriter(path, "key")
    assert path.read_text() == '{"id": 1}\n'


# -----------------------------------------------------------------------------
# outputs bound to their inputs


def test_check_output_refuses_what_it_should_and_compares_paths_resolved(tmp_path, monkeypatch):
    data = tmp_path / "in.jsonl"
    data.write_text('{"id": 1}\n')
    out = tmp_path / "out.jsonl"
    identity = {"inputs": {"prompts": file_identity(data)}, "settings": {"temperature": 0.0}}
    assert check_output(out, "stage-a", identity) is False
    record_output(out, "stage-a", identity)
    out.write_text('{"id": 1}\n')
    # the same file named relatively: the same identity
    monkeypatch.chdir(tmp_path)
    assert check_output(Path("out.jsonl"), "stage-a", {**identity, "inputs": {"prompts": file_identity("in.jsonl")}})
    with pytest.raises(SystemExit, match=r"out\.jsonl: was written by stage-a, not stage-b"):
        check_output(out, "stage-b", identity)
    with pytest.raises(SystemExit, match=r"other settings \(settings\.temperature: 0\.0 -> 0\.7\)"):
        check_output(out, "stage-a", {**identity, "settings": {"temperature": 0.7}})
    data.write_text('{"id": 2}\n')  # the input changed under the same name
    with pytest.raises(SystemExit, match=r"inputs\.prompts\.sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        check_output(out, "stage-a", {**identity, "inputs": {"prompts": file_identity(data)}})
    # a file nobody recorded, or a companion of it, is never written over
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("mine\n")
    with pytest.raises(SystemExit, match=r"foreign\.jsonl: exists and was not written by stage-a"):
        check_output(foreign, "stage-a", identity)
    with pytest.raises(SystemExit, match=r"foreign\.json: exists and was not written by stage-a"):
        write_json_atomic(tmp_path / "foreign.json", [])
        check_output(tmp_path / "new.jsonl", "stage-a", identity, companions=[tmp_path / "foreign.json"])
    assert foreign.read_text() == "mine\n" and not record_path(foreign).exists()


# -----------------------------------------------------------------------------
# stage commands over one work folder: every file unchanged, or written by the command that owns it

STAGE_INPUTS = ("generate/en.jsonl", "generate/fr.jsonl", "translate/en-fr.jsonl", "translate/fr-en.jsonl")
OUTS = (None, "out.jsonl", "generate/en.jsonl")  # the stage's default, a shared name, another command's file
FLAGS = {PAIRS: ([], ["--min-chars", "2"], ["--dominant-pairs", "one"]),
         SDRRL: ([], ["--code-switch-rows", "0"], ["--no-include-english"])}
STEP = st.one_of(
    st.tuples(st.just("run"), st.sampled_from(sorted(FLAGS)), st.integers(0, 2), st.sampled_from(OUTS)),
    st.tuples(st.just("killed"), st.sampled_from(sorted(FLAGS)), st.integers(0, 2), st.sampled_from(OUTS[:2]),
              st.integers(0, 2)),  # killed at the n-th atomic rename (record, rows, report)
    st.tuples(st.just("concurrent"), st.sampled_from(sorted(FLAGS)), st.integers(0, 2), st.sampled_from(OUTS[:2])),
    st.tuples(st.just("edit input"), st.sampled_from(STAGE_INPUTS), st.integers(0, 2)),
    st.tuples(st.just("user file"), st.sampled_from(OUTS[1:])),
)


class Killed(BaseException):
    """SIGKILL, as far as the files can tell."""


def stage_input(name: str, version: int) -> str:
    lang = name.split("/")[1][:2] if name.startswith("generate") else name.split("/")[1][:5]
    rows = []
    for i in ("1", "2", "3"):
        if name.startswith("generate"):
            rows.append({"id": i, "instruction": f"Q{i} {lang}", "response": f"answer {i} in {lang}, v{version}"})
        else:
            rows.append({"id": i, "translation": f"{lang} {i} v{version}" if i != "3" or version else None,
                         "translation_error": None})
    return "".join(json.dumps(row) + "\n" for row in rows)


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def output_paths(folder: Path, command: str, out) -> tuple[Path, set]:
    """OUT and the paths the command owns: OUT, its record, its report, their temporaries and OUT's lock."""
    out = folder / out if out else folder / ("pairs.jsonl" if command == PAIRS else "sdrrl.jsonl")
    owned = {out, record_path(out), out.with_name(out.stem + "_report.json")}
    temporaries = {p for path in owned for p in folder.rglob(path.name + ".tmp*")}
    return out, owned | temporaries | {lock_path(out)}


def leftovers(folder: Path, owned: set) -> list[Path]:
    """The temporaries and lock among the paths a command owns that are still there."""
    return sorted(p for p in owned if p.exists() and (".tmp" in p.name or p.name.endswith(".lock")))


def run_stage(command: str, folder: Path, flags: list, out) -> bool:
    """True when the command wrote its output, False when it refused in a sentence."""
    import lidr.cli.pairs
    import lidr.cli.sdrrl

    main = lidr.cli.pairs.main if command == PAIRS else lidr.cli.sdrrl.main
    argv = ["--dir", str(folder), "--langs", "fr", *flags, *(["--out", str(folder / out)] if out else [])]
    try:
        main(argv)
    except SystemExit as e:
        assert isinstance(e.code, str) and "\n" not in e.code.strip(), e.code  # refused in one sentence
        return False
    return True


def expected_rows(command: str, folder: Path, flags: list) -> list[dict]:
    """What the command makes from the inputs now in `folder` (built in memory, nothing written)."""
    import lidr.pairs
    import lidr.sdrrl
    from lidr.cli import add_flags, from_flags
    from lidr.harness.stage_files import pairs_from_dir, sdrrl_from_dir

    parser = argparse.ArgumentParser()
    defaults = lidr.pairs.PairOptions() if command == PAIRS else lidr.sdrrl.SDRRLOptions()
    add_flags(parser, defaults)
    options = from_flags(parser.parse_args(flags), defaults)
    build = pairs_from_dir if command == PAIRS else sdrrl_from_dir
    return build(folder, ["fr"], options)[0]


@pytest.mark.slow
@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=8))
def test_stage_commands_in_any_order_change_only_what_they_own(steps):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "iter1"
        for name in STAGE_INPUTS:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(stage_input(name, 0))
        succeeded = {}  # (command, flags, out) -> the inputs it succeeded on
        for step in steps:
            before = files_of(folder)
            allowed = set()
            if step[0] == "edit input":
                _, name, version = step
                (folder / name).write_text(stage_input(name, version))
                allowed = {folder / name}
            elif step[0] == "user file":
                path = folder / step[1]
                if not path.exists():
                    path.write_text("the user's own notes\n")
                allowed = {path}
            else:
                command, flags, out = step[1], FLAGS[step[1]][step[2]], step[3]
                target, allowed = output_paths(folder, command, out)
                if step[0] == "run":
                    inputs = {name: before[name] for name in STAGE_INPUTS}
                    wrote = run_stage(command, folder, flags, out)
                    if succeeded.get((command, step[2], out)) == inputs:  # a plain rerun on the same inputs
                        assert wrote and {k: v for k, v in files_of(folder).items() if folder / k not in allowed} == {
                            k: v for k, v in before.items() if folder / k not in allowed}
                        assert target.read_bytes() == before[str(target.relative_to(folder))]
                    if wrote:
                        succeeded[(command, step[2], out)] = inputs
                        rows = [json.loads(line) for line in target.read_text().splitlines()]
                        assert rows == json.loads(json.dumps(expected_rows(command, folder, flags)))
                        recorded = json.loads(record_path(target).read_text())
                        assert recorded["made_by"] == command
                        assert {k: v["sha256"] for k, v in recorded["identity"]["inputs"].items()} == {
                            k: file_identity(folder / f"{k}.jsonl")["sha256"] for k in recorded["identity"]["inputs"]}
                        assert leftovers(folder, allowed) == []  # a killed run's do not outlive one that succeeds
                elif step[0] == "killed":
                    from unittest import mock

                    real, calls = os.replace, []

                    def replace_then_die(*args, kill_at=step[4]):
                        calls.append(args)
                        if len(calls) > kill_at:
                            raise Killed
                        return real(*args)

                    with mock.patch("lidr.harness.outputs.os.replace", replace_then_die):
                        try:
                            run_stage(command, folder, flags, out)
                        except Killed:
                            pass
                    dead = subprocess.Popen([sys.executable, "-c", "pass"])
                    dead.wait()
                    for tmp in folder.rglob(f"*.tmp{os.getpid()}"):  # what the killed process leaves
                        tmp.rename(tmp.with_name(tmp.name.removesuffix(str(os.getpid())) + str(dead.pid)))
                    if calls:
                        lock_path(target).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
                    allowed |= {p for p in folder.rglob("*") if ".tmp" in p.name} | {lock_path(target)}
                else:  # a second process holds the output
                    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
                    stale = lock_path(target).read_bytes() if lock_path(target).exists() else None
                    try:
                        lock_path(target).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
                        assert not run_stage(command, folder, flags, out)
                        lock_path(target).unlink()
                        if stale is not None:  # the lock a killed run had left, as it was
                            lock_path(target).write_bytes(stale)
                    finally:
                        other.kill()
                        other.wait()
                    allowed = set()
            after = files_of(folder)
            changed = {folder / name for name in set(before) | set(after) if before.get(name) != after.get(name)}
            assert changed <= allowed, (step, sorted(map(str, changed - allowed)))
            for name in STAGE_INPUTS:  # no command writes its own inputs
                assert step[0] == "edit input" or after[name] == before[name]
