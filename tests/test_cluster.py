"""Two nodes on one machine: two torchrun agents meeting at a c10d rendezvous on 127.0.0.1, one rank each.

Shared OUT: generation and training give what one process gives. OUT (or the model) not shared,
as on nodes without a shared filesystem (each agent in its own working folder, the same relative
paths): every rank stops with the sentence, and neither folder holds anything afterwards.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, free_port
from safetensors.torch import load_file
from helpers import assert_same_weights, pairs, train_args, write_jsonl

from lidr.cli.generate import main as generate_main
from lidr.cli.train import main as train_main

pytestmark = pytest.mark.slow  # every test runs two torchrun agents


def finish(processes: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """(stdout, stderr) of each process; on a timeout or any error every process is killed, so a
    failed test leaves no agent waiting on a rendezvous behind it."""
    try:
        return [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


def two_nodes(module: str, args: list[str], cwds: list[Path]) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes=2 ... -m module args` as two agents (one process each), agent i in cwds[i]."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test-{port}", "-m", module, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    agents = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for cwd in cwds]
    return [subprocess.CompletedProcess(cmd, agent.returncode, stdout, stderr)
            for agent, (stdout, stderr) in zip(agents, finish(agents, timeout=300))]


def folder_contents(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def prompts_file(folder: Path) -> Path:
    return write_jsonl(folder / "prompts.jsonl", [{"id": f"q{i}", "instruction": f"Count to {i}, then stop."}
                                                  for i in range(7)])


def test_two_nodes_sharing_out_generate_each_row_once_as_one_process(tiny_dir, tmp_path):
    src = prompts_file(tmp_path)
    args = ["--model", str(tiny_dir), "--prompts", str(src), "--max-new-tokens", "5", "--batch-size", "2"]
    generate_main([*args, "--out", str(tmp_path / "one.jsonl")])
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    agents = two_nodes("lidr.cli.generate", [*args, "--out", str(tmp_path / "two.jsonl")],
                       [tmp_path / "node0", tmp_path / "node1"])
    assert [a.returncode for a in agents] == [0, 0], agents[0].stderr[-3000:] + agents[1].stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert [json.loads(line)["id"] for line in (tmp_path / "two.jsonl").read_text().splitlines()] == \
        [f"q{i}" for i in range(7)]
    assert folder_contents(tmp_path / "node0") == folder_contents(tmp_path / "node1") == []  # the probe is gone
    assert not list(tmp_path.glob(".lidr-shared-probe-*"))


def test_two_nodes_not_sharing_out_refuse_on_every_rank_and_write_nothing(tiny_dir, tmp_path):
    src = prompts_file(tmp_path)
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    agents = two_nodes("lidr.cli.generate", ["--model", str(tiny_dir), "--prompts", str(src), "--max-new-tokens", "5",
                                           "--out", "runs/answers.jsonl"], nodes)
    for agent in agents:
        assert agent.returncode != 0
        assert "runs/answers.jsonl is not shared across nodes: rank 1 (on " in agent.stderr, agent.stderr[-3000:]
        assert "give every node one OUT on a shared filesystem" in agent.stderr
    assert folder_contents(nodes[0]) == folder_contents(nodes[1]) == []


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", pairs(8))


def test_two_nodes_sharing_out_train_the_weights_of_one_process(tiny_dir, data, tmp_path):
    train_main(train_args(tiny_dir, data, tmp_path / "one", "--batch-size", "2", "--grad-accum", "2"))
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    agents = two_nodes("lidr.cli.train", train_args(tiny_dir, data, tmp_path / "two", "--batch-size", "2"),
                       [tmp_path / "node0", tmp_path / "node1"])
    assert [a.returncode for a in agents] == [0, 0], agents[0].stderr[-3000:] + agents[1].stderr[-3000:]
    assert "global batch 4 = 2 × 1 accumulation × 2; 2 steps" in agents[0].stdout + agents[1].stdout
    assert_same_weights(load_file(tmp_path / "two" / "model" / "model.safetensors"),
                        load_file(tmp_path / "one" / "model" / "model.safetensors"), atol=1e-5)


def test_two_nodes_not_sharing_the_training_out_refuse_on_every_rank_and_write_nothing(tiny_dir, data, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    agents = two_nodes("lidr.cli.train", train_args(tiny_dir, data, "runs/M1"), nodes)
    for agent in agents:
        assert agent.returncode != 0
        assert "runs/M1 is not shared across nodes: rank 1 (on " in agent.stderr, agent.stderr[-3000:]
    assert folder_contents(nodes[0]) == folder_contents(nodes[1]) == []


def test_two_nodes_seeing_other_models_refuse_on_every_rank_and_write_nothing(tiny_dir, data, tmp_path):
    """OUT is shared, but the relative --model names another checkpoint on each node."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        shutil.copytree(tiny_dir, node / "model")
    config = nodes[1] / "model" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rms_norm_eps": 1e-6}))
    before = [folder_contents(node) for node in nodes]
    agents = two_nodes("lidr.cli.train", train_args("model", data, tmp_path / "run"), nodes)
    for agent in agents:
        assert agent.returncode != 0
        assert "the model folder model is not shared across nodes: rank 1 (on " in agent.stderr, agent.stderr[-3000:]
    assert [folder_contents(node) for node in nodes] == before
    assert folder_contents(tmp_path) == sorted(["node0", "node1", *(f"node{i}/{p}" for i in (0, 1) for p in before[i])])


def test_iterate_on_two_nodes_trains_what_one_process_trains(tiny_dir, data, tmp_path):
    """One iterate.py per node (node 0 and node 1, each in its own working folder, WORK shared), the
    iteration's generation, translation and pairs done earlier: both launch `-m lidr.cli.train` at one c10d
    rendezvous; node 1 waits for node 0's marker; M1 is the one-process run's weights."""
    import lidr.cli.iterate as iterate
    from lidr.harness.stages import stage_identities, write_marker

    iteration = tmp_path / "work" / "iter1"
    trainer = ["--lr", "1e-3", "--warmup-ratio", "0.2", "--max-len", "96", "--batch-size", "2"]
    for lang in ("en", "fr"):
        write_jsonl(tmp_path / "prompts" / f"{lang}.jsonl", [{"id": "1", "instruction": "Q"}])
    args, training = iterate.parse_args(["--model", str(tiny_dir), "--work", str(tmp_path / "work"), "--prompts",
                                         str(tmp_path / "prompts"), "--langs", "fr", "--no-translation-tasks", "--",
                                         *trainer])
    identities = stage_identities(tiny_dir, tmp_path / "prompts", iterate.recipe_from(args, training), 1)
    for name in ("generate", "translate", "pairs"):  # done earlier, as this command would have made them
        write_marker(iteration, name, identities[name])
    shutil.copy(data, iteration / "pairs.jsonl")
    train_main(["--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "one"), *trainer,
                "--grad-accum", "2"])
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    nodes = []
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        cmd = [sys.executable, str(ROOT / "iterate.py"), "--model", str(tiny_dir), "--work", str(tmp_path / "work"),
               "--prompts", str(tmp_path / "prompts"), "--langs", "fr", "--nnodes", "2", "--node-rank", str(rank),
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--no-translation-tasks", "--", *trainer]
        nodes.append(subprocess.Popen(cmd, cwd=tmp_path / f"node{rank}", env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = finish(nodes, timeout=300)
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    for stdout, _ in outputs:
        assert "-m lidr.cli.train" in stdout and "--rdzv-id=work-work-iter1-train" in stdout
    assert f"[iter 1/1] train: waiting for node 0 to mark it done ({iteration / 'done' / 'train'})" in outputs[1][0]
    assert_same_weights(load_file(iteration / "train" / "model" / "model.safetensors"),
                        load_file(tmp_path / "one" / "model" / "model.safetensors"), atol=1e-5)
    assert folder_contents(tmp_path / "node0") == folder_contents(tmp_path / "node1") == []
