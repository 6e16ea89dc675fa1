"""The README's main job at --quick size (the CI smoke tests): every stage runs and the report is made,
in the controlled world (the default) and on SmolLM2-135M-Instruct (--model smollm2)."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from matplotlib.image import imread

pytestmark = pytest.mark.slow  # every test here runs whole commands (minutes)


def test_world_demo_quick_runs_every_stage_and_control(tmp_path):
    work = tmp_path / "world"
    run = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--quick", "--controls", "--work", str(work)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads((work / "report" / "results.json").read_text())
    names = ["M0", "M1", "M2", "SDRRL-1", "SDRRL-2", "broken-M0", "broken-M1", "broken-M2", "swapped-M1",
             "swapped-M2", "gold-SFT"]
    assert list(results) == names
    for name in names:  # results.json holds what eval.mgsm scored, row by row
        for lang in ("en", "es", "fr", "de", "ru"):
            rows = [json.loads(line) for line in open(work / "eval" / name / "mgsm" / f"{lang}.jsonl")]
            assert len(rows) == 8 and results[name][lang] == sum(r["correct"] for r in rows) / 8
    # SDRRL trains on SFT rows, the swapped control on reversed pairs of the same answers as LIDR
    assert "nll" in (work / "sdrrl" / "iter1" / "train" / "log.jsonl").read_text().splitlines()[0]
    pairs = [json.loads(line) for line in open(work / "lidr" / "iter1" / "pairs.jsonl")]
    swapped = [json.loads(line) for line in open(work / "swapped" / "iter1" / "pairs.jsonl")]
    assert [(p["rejected"], p["chosen"]) for p in pairs] == [(p["chosen"], p["rejected"]) for p in swapped]
    report = (work / "report" / "report.md").read_text()
    assert "| gold-SFT |" in report and "| LIDR | 1 | fr |" in report and "| broken | 2 | ru |" in report
    charts = list((work / "report").glob("*.png"))
    assert charts and all(imread(p).shape[0] > 100 for p in charts)


def test_smollm2_demo_quick_runs_every_stage(demo_dir, tmp_path):
    work = tmp_path / "demo"
    run = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--model", "smollm2", "--quick", "--work", str(work),
                          "--train-nproc", "2"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for name in ("M0", "M1", "M2"):
        summary = json.loads((work / "eval" / name / "mgsm" / "summary.json").read_text())
        assert set(summary["languages"]) == {"en", "es", "fr", "de", "ru"}
        assert all(s["n"] == 4 for s in summary["languages"].values())
    for t in (1, 2):
        log = (work / f"iter{t}" / "train" / "log.jsonl").read_text().splitlines()
        assert log and "2 rank(s) on cpu" in run.stdout + run.stderr  # torchrun, FSDP over gloo
        assert (work / f"iter{t}" / "train" / "model" / "model.safetensors").is_file()
    report = (work / "report" / "report.md").read_text()
    assert "| M0 |" in report and "| M2 |" in report
    # what each iteration learned from; at step 1 the policy is the reference, so the DPO loss is ln 2
    assert "| LIDR | 2 | ru |" in report and re.search(r"- LIDR, iteration 2: \d+ steps; dpo 0\.693 → ", report)
    charts = list((work / "report").glob("*.png"))
    assert charts and all(imread(p).shape[0] > 100 for p in charts)
    assert "| M0 |" in run.stdout  # the table is printed at the end
