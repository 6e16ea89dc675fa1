"""iterate.py end to end on the demo model (a few prompts, a few steps), killed mid-stage and resumed."""

import json
import os
import signal
import subprocess
import sys

import pytest

from helpers import ROOT

from lidr.checkpoint import load_model
from world.problems import write_sets


@pytest.mark.slow
def test_iteration_end_to_end_and_resume_after_sigkill(demo_dir, tmp_path):
    write_sets(tmp_path / "problems", n_train=3, n_eval=1, langs=("en", "fr"))
    work = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "iterate.py"), "--model", str(demo_dir), "--work", str(work),
           "--prompts", str(tmp_path / "problems" / "train"), "--langs", "fr", "--no-translation-tasks",
           "--max-new-tokens", "24",
           "--translate-max-new-tokens", "40", "--batch-size", "3",
           "--translate-repetition-penalty", "1.1",  # SmolLM2 loops on the pre-filled tag without a penalty
           # most of SmolLM2's back-translations fail: the reference's rule (drop both pairs) would leave none
           "--pairs-failed-translation", "drop-one",
           "--", "--batch-size", "2", "--max-len", "256", "--lr", "1e-5", "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    seen = b""
    while b"translate fr -> en" not in seen:  # the second translation job has started: kill mid-stage
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, f"iterate.py ended before it was killed:\n{seen.decode(errors='replace')}"
        seen += chunk
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    iteration = work / "iter1"
    assert (iteration / "done" / "generate").exists() and not (iteration / "done" / "translate").exists()
    generated = {p.name: p.read_bytes() for p in (iteration / "generate").glob("*.jsonl")}
    first_translation = (iteration / "translate" / "en-fr.jsonl").read_bytes()

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "[iter 1/1] generate: done earlier, skipped" in rerun.stdout
    assert "0 generated now, 3 already there" in rerun.stdout  # en -> fr was finished: nothing redone
    assert {p.name: p.read_bytes() for p in (iteration / "generate").glob("*.jsonl")} == generated
    assert (iteration / "translate" / "en-fr.jsonl").read_bytes() == first_translation
    for stage in ("generate", "translate", "pairs", "train"):
        assert (iteration / "done" / stage).exists()

    report = json.loads((iteration / "pairs_report.json").read_text())
    pairs = [json.loads(line) for line in (iteration / "pairs.jsonl").read_text().splitlines()]
    assert report["pairs"] == len(pairs) > 0
    assert {p["direction"] for p in pairs} <= {"non_dominant", "dominant"}
    log = [json.loads(line) for line in (iteration / "train" / "log.jsonl").read_text().splitlines()]
    assert log and all(row["loss"] == row["loss"] for row in log)  # trained, and no NaN
    trained = load_model(iteration / "train" / "model")
    assert trained.cfg.n_layers == 30

    # a third run has nothing left to do
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert all(f"{s}: done earlier, skipped" in again.stdout for s in ("generate", "translate", "pairs", "train"))


def test_an_iteration_with_fewer_pairs_than_one_batch_keeps_its_model(tiny_dir, tmp_path):
    """When M_t's answers and its translations of them agree almost everywhere, the pairs do not fill one
    global batch: the iteration trains nothing, says so in train/unchanged.json, and M_{t+1} is M_t. The
    decision counts the rows the trainer would keep (here 4 lines, 3 usable: one has chosen == rejected)."""
    from dataclasses import replace

    from lidr.harness.stages import Nodes, Runner, stage_identities, write_marker
    from lidr.iterate import Recipe, run_iteration
    from lidr.settings import TRAINING

    folder, prompts = tmp_path / "iter2", tmp_path / "prompts"
    prompts.mkdir()
    for lang in ("en", "fr"):
        (prompts / f"{lang}.jsonl").write_text('{"id": "1", "instruction": "Q"}\n')
    recipe = Recipe(langs=("fr",), training=replace(TRAINING, batch_size=2, grad_accum=1))
    identities = stage_identities(tiny_dir, prompts, recipe, train_nproc=2)
    for name in ("generate", "translate", "pairs"):  # finished earlier: only training is left
        write_marker(folder, name, identities[name])
    pair = {"id": "1", "lang": "fr", "direction": "non_dominant", "prompt": "Q", "chosen": "a", "rejected": "b"}
    rows = [pair] * 3 + [{**pair, "rejected": "a"}]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    runner = Runner(tiny_dir, prompts, folder, recipe, "iter 2/2", 16, 1, 2, Nodes())
    assert run_iteration(runner, prompts, folder, recipe) == tiny_dir
    assert json.loads((folder / "train" / "unchanged.json").read_text()) == {
        "rows": 4, "usable_rows": 3, "global_batch": 4, "model": str(tiny_dir)}
    assert (folder / "done" / "train").exists() and not (folder / "train" / "model").exists()
    # a rerun finds the stage done and gives M_t again
    runner = Runner(tiny_dir, prompts, folder, recipe, "iter 2/2", 16, 1, 2, Nodes())
    assert run_iteration(runner, prompts, folder, recipe) == tiny_dir
