"""iterate.py end to end on the demo model (a few prompts, a few steps), killed mid-stage and resumed."""

import json
import os
import signal
import subprocess
import sys

import pytest

from helpers import ROOT, write_jsonl

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
           "--", "--batch-size", "2", "--max-len", "256", "--lr", "1e-5"]
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
    identities = stage_identities(tiny_dir, prompts, recipe, train_processes=2)
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


# -----------------------------------------------------------------------------
# what a stage is made from: every input and setting that changes its result


def test_the_train_stage_record_holds_every_nodes_processes(tiny_dir, tmp_path):
    """The global batch is --batch-size × --grad-accum × --train-nproc × --nnodes: a rerun on two nodes of a
    WORK trained on one would train on another batch; it is refused, naming the batch, like any other change."""
    from dataclasses import replace

    from lidr.harness.stages import Nodes, claim_work, stage_identities, write_marker
    from lidr.iterate import Recipe
    from lidr.settings import TRAINING

    prompts = tmp_path / "prompts"
    for lang in ("en", "fr"):
        write_jsonl(prompts / f"{lang}.jsonl", [{"id": "1", "instruction": "Q"}])
    recipe = Recipe(langs=("fr",), training=replace(TRAINING, batch_size=2, grad_accum=3))
    work = tmp_path / "work"
    identities = stage_identities(tiny_dir, prompts, recipe, 4)  # --train-nproc 4, one node
    assert identities["train"]["global_batch"] == 2 * 3 * 4
    for name in ("generate", "translate", "pairs", "train"):
        write_marker(work / "iter1", name, identities[name], result=str(tiny_dir))
    with claim_work(tiny_dir, [prompts], work, recipe, 1, 4, Nodes(), None):  # the same: nothing to redo
        pass
    two_nodes = Nodes(count=2, rank=0, endpoint="127.0.0.1:29500", job="test")
    with pytest.raises(SystemExit, match=r"done/train: done from other inputs or settings than this command's "
                                         r"\(global_batch: 24 -> 48\); rerun with --redo-from train"):
        with claim_work(tiny_dir, [prompts], work, recipe, 1, 4, two_nodes, None):
            pass


def run_iterate(tiny_dir, prompts, work, *extra, stops="no pairs were made"):
    """lidr.cli.iterate on the tiny random model, stopping with `stops`: its translations never close their tag,
    so no pair is made and the command stops at the pairs stage, generation and translation done."""
    from lidr.cli.iterate import main

    with pytest.raises(SystemExit, match=stops):
        main(["--model", str(tiny_dir), "--work", str(work), "--prompts", str(prompts), "--langs", "fr",
              "--no-translation-tasks", "--max-new-tokens", "3", "--translate-max-new-tokens", "3", *extra])


def test_translations_of_answers_made_again_are_refused_and_redone(tiny_dir, tmp_path):
    """A user who regenerates one answers file (as a refusal told them to) leaves the translations of the old
    answers beside it: pairs would join new answers to old translations. Each translation's record names the
    sha256 of the answers it translated: lidr.cli.pairs refuses, iterate.py refuses until --redo-from translate."""
    from lidr.cli.generate import main as generate
    from lidr.cli.pairs import main as pairs
    from lidr.harness.outputs import file_identity, record_path

    prompts, work = tmp_path / "prompts", tmp_path / "work"
    for lang in ("en", "fr"):
        write_jsonl(prompts / f"{lang}.jsonl", [{"id": i, "instruction": f"Q{i} {lang}"} for i in range(2)])
    run_iterate(tiny_dir, prompts, work)
    folder = work / "iter1"
    answers, translation = folder / "generate" / "fr.jsonl", folder / "translate" / "fr-en.jsonl"
    translated = translation.read_bytes()

    answers.unlink()  # the answers made again, with other settings
    record_path(answers).unlink()
    generate(["--model", str(tiny_dir), "--prompts", str(prompts / "fr.jsonl"), "--out", str(answers),
              "--max-new-tokens", "5"])
    with pytest.raises(SystemExit, match=rf"{translation}: was translated from another version of {answers} "
                                         r"\(sha256 \w{12}, now \w{12}\): the answers were made again since; "
                                         r"translate it again"):
        pairs(["--dir", str(folder), "--langs", "fr", "--out", str(tmp_path / "pairs.jsonl")])
    assert not (tmp_path / "pairs.jsonl").exists()  # nothing made from the mismatched files
    run_iterate(tiny_dir, prompts, work, stops=r"done/translate: done from other inputs or settings than this "
                                               r"command's \(translate/fr-en\.jsonl: translated another version of "
                                               r"generate/fr\.jsonl\); rerun with --redo-from translate")
    assert translation.read_bytes() == translated  # refused untouched
    run_iterate(tiny_dir, prompts, work, "--redo-from", "translate")
    recorded = json.loads(record_path(translation).read_text())["identity"]["inputs"]["prompts"]["sha256"]
    assert recorded == file_identity(answers)["sha256"]  # translated again, from the answers as they are now
