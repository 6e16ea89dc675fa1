"""A folder given with no name of its own ('.', '..'): its record and lock go beside it under its real name,
or the command refuses in one sentence; never a traceback from an empty path name (lidr.harness.outputs.named)."""

import os
import subprocess
import sys

from helpers import ROOT, write_jsonl

from lidr.harness.outputs import lock_path, named, record_path


def run_in(folder, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)


def test_dot_and_dotdot_are_named_by_the_folder_they_stand_for(tmp_path, monkeypatch):
    (tmp_path / "runs" / "M1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "runs" / "M1")
    assert named(".") == tmp_path / "runs" / "M1" and named("..") == tmp_path / "runs"
    assert record_path(".") == tmp_path / "runs" / "M1.made-from.json"
    assert lock_path("sub/..") == tmp_path / "runs" / "M1.lock"


def test_a_training_run_into_dot_is_refused_in_one_sentence_when_the_folder_is_the_users(tiny_dir, data, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_in(tmp_path, ["lidr.cli.train", "--model", str(tiny_dir), "--data", str(data), "--out", ".",
                               "--max-len", "96"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f".: is a folder that lidr.cli.train did not make (no {tmp_path.name}.made-from.json beside it; it holds "
        f"notes.txt); it is left as it is: choose a new or empty --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_generating_into_dot_is_refused_in_one_sentence(tiny_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "in" / "prompts.jsonl", [{"id": 1, "instruction": "Say hi."}])
    result = run_in(tmp_path / "in", ["lidr.cli.generate", "--model", str(tiny_dir), "--prompts", str(prompts),
                                      "--out", ".", "--max-new-tokens", "2"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(".: exists and was not written by lidr.cli.generate")
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["prompts.jsonl"]
