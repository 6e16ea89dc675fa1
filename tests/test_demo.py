"""The README's main job at --quick size (the CI smoke test): every stage runs and the report is made."""

import json
import re
import subprocess
import sys

from conftest import ROOT
from matplotlib.image import imread


def test_demo_quick_runs_every_stage(demo_dir, tmp_path):
    work = tmp_path / "demo"
    run = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--quick", "--work", str(work)], cwd=ROOT,
                         capture_output=True, text=True)
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
    assert "| 2 | ru |" in report and re.search(r"- iteration 2: \d+ steps; DPO loss 0\.693 → ", report)
    charts = list((work / "report").glob("*.png"))
    assert charts and all(imread(p).shape[0] > 100 for p in charts)
    assert "| M0 |" in run.stdout  # the table is printed at the end
