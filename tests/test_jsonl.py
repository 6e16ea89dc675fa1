"""The resumable JSONL layer (lidr/jsonl.py): killed anywhere, torn anywhere, resumed; and outputs
bound to what they were made from."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lidr.jsonl import (
    ResumableWriter, check_output, file_identity, read_records, record_output, record_path, write_json_atomic,
)

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
