"""torchrun's variables without torchrun (left in a shell, copied from a job script): all of them or none, one
sentence otherwise, and never a wait for processes that were never started (lidr/harness/cluster.py `launch`)."""

import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from helpers import ROOT, free_port, run_subprocess, write_jsonl

from lidr.harness import cluster
from lidr.train import setup_distributed

EVERY = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
VARIABLES = tuple(EVERY)  # what torchrun sets for each process, in the order the sentences name them


def environment(monkeypatch, **values):
    for name in (*VARIABLES, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("present", [("RANK",), ("WORLD_SIZE",), ("MASTER_ADDR", "MASTER_PORT"),
                                     ("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("RANK", "WORLD_SIZE", "MASTER_ADDR")])
def test_some_of_torchruns_variables_are_refused_naming_what_is_set_and_missing(present, monkeypatch):
    environment(monkeypatch, **{name: EVERY[name] for name in present})
    missing = [name for name in VARIABLES if name not in present]
    for call in (cluster.rank_and_world, cluster.join, setup_distributed):
        with pytest.raises(SystemExit) as stopped:
            call()
        sentence = stopped.value.code
        assert isinstance(sentence, str) and "\n" not in sentence
        assert all(f"{name}={EVERY[name]}" in sentence for name in present)
        assert f"{', '.join(missing)} not set" in sentence
    assert not dist.is_initialized()


@pytest.mark.parametrize("values,problem", [
    (dict(RANK="2"), "RANK below WORLD_SIZE"),
    (dict(RANK="-1"), "each of them a whole number"),
    (dict(WORLD_SIZE="two"), "each of them a whole number"),
    (dict(WORLD_SIZE="0"), "WORLD_SIZE at least 1"),
    (dict(LOCAL_RANK="3"), "LOCAL_RANK below its node's processes"),
    (dict(LOCAL_RANK="1", LOCAL_WORLD_SIZE="1"), "LOCAL_RANK below its node's processes"),
    (dict(MASTER_PORT="70000"), "MASTER_PORT a port"),
])
def test_values_that_cannot_be_one_launch_are_refused(values, problem, monkeypatch):
    environment(monkeypatch, **{**EVERY, **values})
    with pytest.raises(SystemExit, match=f"torchrun's variables do not describe one launch .*torchrun sets {problem}"):
        cluster.rank_and_world()


def test_a_world_of_one_with_every_variable_is_a_plain_run(monkeypatch):
    environment(monkeypatch, **{**EVERY, "WORLD_SIZE": "1", "MASTER_PORT": "1"})  # a port nobody could bind
    assert cluster.launch() == (0, 1, 0) and cluster.join() == (0, 1)
    ranks = setup_distributed()  # a one-rank group: no store, no port
    try:
        assert (ranks.rank, ranks.world) == (0, 1) and dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_launch_whose_other_processes_never_come_stops_instead_of_waiting(rank, tmp_path):
    """Rank 0 would wait a day for its peer to connect, rank 1 a day for a server nobody started; here each
    stops within the rendezvous timeout (made 3 s), in one sentence, with no traceback."""
    code = ("import datetime, lidr.harness.cluster as c; c.RENDEZVOUS_TIMEOUT = datetime.timedelta(seconds=3); "
            "c.join()")
    env = {**os.environ, **EVERY, "RANK": rank, "MASTER_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    try:
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the process waited for a peer that was never launched")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()  # torch's own C++ log may come first: the sentence ends it
    assert "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith(f"rank {rank} of 2 found no process group at 127.0.0.1:") and "within 3 s" in lines[-1]
    assert "unset RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT" in lines[-1]


def test_a_command_in_a_shell_with_a_stray_variable_says_so_in_one_line(tiny_dir, tmp_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "instruction": "Say hi."}])
    environment(monkeypatch, WORLD_SIZE="4")
    result = run_subprocess([sys.executable, "-m", "lidr.cli.generate", "--model", str(tiny_dir), "--prompts",
                             str(prompts), "--out", str(tmp_path / "out.jsonl"), "--max-new-tokens", "2"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "torchrun's variables are set only in part (WORLD_SIZE=4; RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not "
        "set): launch with torchrun, or unset WORLD_SIZE for a one-process run")
    assert not (tmp_path / "out.jsonl").exists()
