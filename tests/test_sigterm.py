"""SIGTERM (a scheduler's kill, torchrun stopping its workers): every command ends in one sentence and exit
status 143, releasing what it holds, and a rerun resumes (lidr/cli/__init__.py `command`)."""

import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, write_jsonl

from lidr.cli import command
from lidr.harness.outputs import hold_lock, lock_path

SENTENCE = "stopped by SIGTERM; rerun the same command to resume"
COMMANDS = ["lidr.cli.generate", "lidr.cli.translate", "lidr.cli.pairs", "lidr.cli.sdrrl", "lidr.cli.train",
            "lidr.cli.iterate", "eval.mgsm", "eval.alpacaeval", "eval.agreement", "eval.report"]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_is_behind_the_door_that_turns_sigterm_into_a_sentence(module):
    main = importlib.import_module(module).main
    assert main.__code__ is command()(lambda: None).__code__, f"{module}.main is not decorated with command()"


def test_sigterm_releases_what_the_command_holds_and_ends_in_one_sentence(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    before = signal.getsignal(signal.SIGTERM)

    @command()
    def main():
        with hold_lock(out, "a test"):
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the command")

    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 143
    assert capsys.readouterr().err.strip().splitlines() == [SENTENCE]
    assert not lock_path(out).exists()  # released on the way out
    assert signal.getsignal(signal.SIGTERM) is before  # the door gives the handler back


@pytest.mark.slow
def test_a_generation_stopped_by_sigterm_says_so_and_the_rerun_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "instruction": f"Count to {i}."} for i in range(30)])
    args = ["--model", str(tiny_dir), "--prompts", str(prompts), "--max-new-tokens", "12", "--batch-size", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "lidr.cli.generate", *args, "--out", str(tmp_path / "whole.jsonl")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    out = tmp_path / "stopped.jsonl"
    cmd = [sys.executable, "-m", "lidr.cli.generate", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    while b"3/30" not in seen:  # the progress bar: a few rows are written
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, f"the command ended before it was stopped: {seen.decode(errors='replace')}"
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    seen += proc.stderr.read()
    proc.wait(60)
    stderr = seen.decode(errors="replace")
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert stderr.rstrip().endswith(SENTENCE)  # (a progress line it interrupted may stand before it)
    assert not lock_path(out).exists() and not lock_path(Path(f"{out}.rank0.partial")).exists()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


@pytest.mark.slow
def test_iterate_passes_sigterm_on_to_the_torchrun_it_launched(tiny_dir, tmp_path):
    """iterate.py stopped while a stage runs under torchrun: torchrun is stopped with SIGTERM (not SIGKILL, which
    would leave its workers running, holding the stage's output), and each worker ends in the sentence."""
    import time

    prompts = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "instruction": f"Count to {i}."} for i in range(80)])
    out = tmp_path / "out.jsonl"
    stage = ("from lidr.cli import command; from lidr.harness.stages import Nodes, torchrun; "
             f"command()(lambda: torchrun('lidr.cli.generate', ['--model', {str(tiny_dir)!r}, '--prompts', "
             f"{str(prompts)!r}, '--out', {str(out)!r}, '--max-new-tokens', '12', '--batch-size', '1'], 1, Nodes(), "
             f"{str(out)!r}))()")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", stage], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    seen = b""
    while b"/80" not in seen:  # the first progress line: the worker is generating
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, f"the stage ended before it was stopped: {seen.decode(errors='replace')}"
        seen += chunk
    assert lock_path(out).exists()  # the worker holds its output
    proc.send_signal(signal.SIGTERM)  # the iteration's process only, as a scheduler stops a job's main process
    seen += proc.stderr.read()
    proc.wait(120)
    stderr = seen.decode(errors="replace")
    assert proc.returncode == 143 and stderr.rstrip().endswith(SENTENCE), stderr
    assert stderr.count(SENTENCE) == 2  # the worker's, then the iteration's
    deadline = time.time() + 30
    while lock_path(out).exists() and time.time() < deadline:
        time.sleep(0.5)
    assert not lock_path(out).exists(), "a worker outlived the iteration and still holds its output"
