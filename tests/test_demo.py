"""The README's main job at --quick size (the CI smoke tests): every stage and arm runs and the report is made,
in the controlled world (the default) and on SmolLM2-135M-Instruct (--model smollm2)."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT
from matplotlib.image import imread

pytestmark = pytest.mark.slow  # every test here runs whole commands (minutes)


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def gold_answer(question: str) -> str:
    """The answer recomputed from an English question alone: "buys" adds, every other problem gives some away."""
    a, b = map(int, re.findall(r"\d+", question)[:2])
    return str(a + b if "buys" in question else a - b)


def last_number(text: str):
    found = re.findall(r"\d+", text)
    return found[-1] if found else None


def test_world_demo_quick_runs_every_arm_and_control(tmp_path):
    work = tmp_path / "world"
    # the sampled world's dials too: soft English errors, answers at temperature 1, two per prompt
    command = [sys.executable, str(ROOT / "demo.py"), "--quick", "--controls", "--pair-noise", "0.5", "--noise-split",
               "--english-soft-error-rate", "0.3", "--temperature", "1", "--samples", "2", "--work", str(work)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)  # --jobs 2: LIDR, baselines side by side
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads((work / "report" / "results.json").read_text())
    names = ["M0", "M1", "M2", "SDRRL-1", "SDRRL-2", "DPO-only-1", "NLL-only-1", "gold-SFT", "pair-noise-0.5-1",
             "pair-noise-0.5-dpo-only", "pair-noise-0.5-nll-only", "broken-M0", "broken-M1", "broken-M2", "swapped-M1",
             "swapped-M2"]
    # dev: where world/tune.py chooses, not the demo; test-sampled: test again, answers sampled at temperature 1
    assert list(results) == ["test", "ood", "test-sampled", "pairs", "pair_noise"]
    for split in ("test", "ood", "test-sampled"):
        assert list(results[split]) == names
        for name in names:  # results.json holds what eval.mgsm scored, row by row, on that split's problems
            for lang in ("en", "es", "fr", "de", "ru"):
                rows = read_jsonl(work / "eval" / split / name / "mgsm" / f"{lang}.jsonl")
                assert len(rows) == 8 and results[split][name][lang] == sum(r["correct"] for r in rows) / 8
                asked = read_jsonl(work / "world" / split.replace("-sampled", "") / f"{lang}.jsonl")
                assert {r["question"] for r in rows} == {r["query"] for r in asked}
    sampled = [(r["answer"], g["answer"]) for name in names for lang in ("en", "es", "fr", "de", "ru")
               for r, g in zip(read_jsonl(work / "eval" / "test-sampled" / name / "mgsm" / f"{lang}.jsonl"),
                               read_jsonl(work / "eval" / "test" / name / "mgsm" / f"{lang}.jsonl"))]
    assert sum(s != g for s, g in sampled) > len(sampled) / 2  # sampled, not the greedy answers again
    # pairs against gold: recomputed from the English prompt of each pair's id; two answers per prompt, so two pairs
    for t in ("1", "2"):
        prompts = read_jsonl(work / "world" / f"prompts{t}" / "en.jsonl")
        assert [r["id"] for r in prompts] == [f"iter{t}-{i}~{k}" for i in range(8) for k in (0, 1)]
        questions = {r["id"]: r["instruction"] for r in prompts}
        pairs = read_jsonl(work / "lidr" / f"iter{t}" / "pairs.jsonl")
        right = sum(last_number(p["chosen"]) == gold_answer(questions[p["id"]]) != last_number(p["rejected"])
                    for p in pairs)
        assert results["pairs"][t]["n"] == len(pairs) and results["pairs"][t]["accuracy"] == right / len(pairs)
        answers = {r["id"]: r["response"] for r in read_jsonl(work / "lidr" / f"iter{t}" / "generate" / "en.jsonl")}
        assert sum(answers[f"iter{t}-{i}~0"] != answers[f"iter{t}-{i}~1"] for i in range(8)) >= 6  # two draws each
    # every one-iteration arm learned from LIDR's iteration-1 pairs, as its objective says
    lidr_pairs = read_jsonl(work / "lidr" / "iter1" / "pairs.jsonl")
    assert read_jsonl(work / "dpo-only" / "iter1" / "pairs.jsonl") == lidr_pairs
    assert json.loads((work / "dpo-only" / "iter1" / "train" / "run.json").read_text())["alpha"] == 0.0
    assert [r["response"] for r in read_jsonl(work / "nll-only" / "rows.jsonl")] == [p["chosen"] for p in lidr_pairs]
    assert json.loads((work / "nll-only" / "train" / "run.json").read_text())["objective"] == "sft"
    noisy = read_jsonl(work / "pair-noise-0.5-1" / "iter1" / "pairs.jsonl")
    flipped = [(n["chosen"], n["rejected"]) == (p["rejected"], p["chosen"]) for n, p in zip(noisy, lidr_pairs)]
    assert len(noisy) == len(lidr_pairs) and sum(flipped) == round(0.5 * len(lidr_pairs))
    assert all(n == p for n, p, f in zip(noisy, lidr_pairs, flipped) if not f)
    assert results["pair_noise"]["0.5"]["n"] == len(noisy)
    # the noise split: DPO only on the very pairs LIDR's noise arm swapped, NLL only on their chosen answers
    assert read_jsonl(work / "pair-noise-0.5-1-dpo-only" / "iter1" / "pairs.jsonl") == noisy
    assert json.loads((work / "pair-noise-0.5-1-dpo-only" / "iter1" / "train" / "run.json").read_text())["alpha"] == 0.0
    assert [r["response"] for r in read_jsonl(work / "pair-noise-0.5-1-nll-only" / "rows.jsonl")] == [
        n["chosen"] for n in noisy]
    # the same chat turns for every arm: no row any arm trains on has a system turn
    for rows in ("gold/rows.jsonl", "nll-only/rows.jsonl", "sdrrl/iter1/sdrrl.jsonl", "lidr/iter2/pairs.jsonl"):
        assert all("system" not in r for r in read_jsonl(work / rows))
    # SDRRL trains on SFT rows, the swapped control on reversed pairs of the same answers as LIDR
    assert "nll" in (work / "sdrrl" / "iter1" / "train" / "log.jsonl").read_text().splitlines()[0]
    swapped = read_jsonl(work / "swapped" / "iter1" / "pairs.jsonl")
    assert [(p["rejected"], p["chosen"]) for p in lidr_pairs] == [(p["chosen"], p["rejected"]) for p in swapped]
    report = (work / "report" / "report.md").read_text()
    assert "## Accuracy: test\n" in report and "| ood en | ood avg |" in report
    assert "| gold-SFT |" in report and "| 2 all |" in report
    assert "| LIDR | 1 | fr |" in report and "| broken | 2 | ru |" in report and "| SDRRL | 2 | de |" in report
    charts = list((work / "report").glob("*.png"))
    assert charts and all(imread(p).shape[0] > 100 for p in charts)
    # --jobs 2 made DPO only and NLL only in a process of its own; made again here by one process, they are equal
    for arm, name in (("dpo-only", "DPO-only-1"), ("nll-only", "NLL-only-1")):
        shutil.rmtree(work / arm)
        for split in ("test", "ood", "test-sampled"):
            shutil.rmtree(work / "eval" / split / name)
    again = subprocess.run(command + ["--jobs", "1"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "NLL only" in again.stdout and "[demo] baselines" not in again.stdout  # made now, in this process
    assert json.loads((work / "report" / "results.json").read_text()) == results


def test_smollm2_demo_quick_runs_every_stage(demo_dir, tmp_path):
    work = tmp_path / "demo"
    # one training process: FSDP over several is tested in test_train.py, test_iterate.py and test_cluster.py
    run = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--model", "smollm2", "--quick", "--work", str(work)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for name in ("M0", "M1"):  # --quick: one iteration
        summary = json.loads((work / "eval" / name / "mgsm" / "summary.json").read_text())
        assert set(summary["languages"]) == {"en", "es", "fr", "de", "ru"}
        assert all(s["n"] == 4 for s in summary["languages"].values())
    assert not (work / "eval" / "M2").exists() and not (work / "iter2").exists()
    log = (work / "iter1" / "train" / "log.jsonl").read_text().splitlines()
    assert log and "1 rank(s) on cpu" in run.stdout + run.stderr
    assert (work / "iter1" / "train" / "model" / "model.safetensors").is_file()
    report = (work / "report" / "report.md").read_text()
    assert "| M0 |" in report and "| M1 |" in report
    # what each iteration learned from; at step 1 the policy is the reference, so the DPO loss is ln 2
    assert "| LIDR | 1 | ru |" in report and re.search(r"- LIDR, iteration 1: \d+ steps; dpo 0\.693 → ", report)
    charts = list((work / "report").glob("*.png"))
    assert charts and all(imread(p).shape[0] > 100 for p in charts)
    assert "| M0 |" in run.stdout  # the table is printed at the end
