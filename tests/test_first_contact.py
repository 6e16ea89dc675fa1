"""bench/first_contact.py where it can run without a GPU: its refusal, its CPU dry run of every section (records,
the kill-and-resume of train_dpo.py, no verdict against a goal) and a window too short for any section."""

import json
import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

SECTIONS = ["environment", "decode_probe", "compiled_vs_eager", "correctness", "train", "gpu_bench"]


def first_contact(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/first_contact.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def verdicts(text: str) -> list[str]:
    """Anything that reads as a verdict against a goal."""
    return re.findall(r".{0,60}\b(?:goal|met)\b.{0,20}", text, flags=re.IGNORECASE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: bench/first_contact.py would run")
@pytest.mark.slow  # a subprocess that imports torch
def test_without_a_gpu_it_refuses_in_one_sentence(tmp_path):
    proc = first_contact("--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("bench/first_contact.py needs a CUDA GPU and this machine has none (--cpu-dry-run "
                                   "runs it on CPU at tiny sizes).")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # every section, three torchrun launches and bench/gpu.py: about 40-90 s on 2 busy cores
def test_cpu_dry_run_records_every_section_and_the_resumed_run_matches(tmp_path):
    proc = first_contact("--cpu-dry-run", "--out", str(tmp_path), "--minutes", "3.5")  # it ends, and cleans up, first
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = (tmp_path / "first_contact.json").read_text()
    record, markdown = json.loads(text), (tmp_path / "first_contact.md").read_text()
    assert list(record["sections"]) == SECTIONS
    for name, section in record["sections"].items():  # each measured something, or says why not
        assert (section["status"] == "ok" and section["results"]) or section.get("skip_reason"), (name, section)
    assert {name: s["status"] for name, s in record["sections"].items()} == dict.fromkeys(SECTIONS, "ok")
    assert "| section | what | value | check |" in markdown and markdown.strip() in proc.stdout
    assert [r["section"] for r in record["rows"] if r["check"] == "FAIL"] == []

    train = record["sections"]["train"]["results"]
    assert train["checkpoint_step_at_kill"] == 2 and train["exit_codes"] == {"whole": 0, "resumed": 0}
    assert train["largest_weight_difference"] == 0 and train["resumed_equals_uninterrupted"] is True
    assert train["export_loads"] and train["export_dtype"] == "bfloat16" and train["export_finite"]
    assert [s["step"] for s in train["log"]] == [1, 2, 3, 4, 5, 6]
    compared = record["sections"]["compiled_vs_eager"]["results"]
    assert compared["mismatches"] == [] and compared["compactions"]["eager"] and compared["compactions"]["compiled"]
    correctness = record["sections"]["correctness"]["results"]
    assert correctness["flex_decode_error"] < 1e-2 and correctness["flex_training_error"] < 1e-2
    assert "flex training backward" in correctness["skipped"]  # no flex backward on CPU, said so
    probe = record["sections"]["decode_probe"]["results"]
    assert probe["shape"] == "tiny (CPU dry run)" and probe["step_s_median"] > 0 and probe["cuda_graphs_skipped"] == 0
    assert record["sections"]["gpu_bench"]["results"]["exit_status"] == 0
    assert any(r["section"] == "gpu_bench" and r["what"].startswith("decode: ") for r in record["rows"])
    for output in (proc.stdout, text, markdown):  # a dry run states what it measured, never a verdict
        assert verdicts(output) == []


@pytest.mark.slow
def test_a_window_with_no_time_left_skips_every_section_saying_why(tmp_path):
    """--minutes 0: no section has the time it needs, each is skipped with the reason (no timing involved)."""
    proc = first_contact("--cpu-dry-run", "--out", str(tmp_path), "--minutes", "0", timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sections = json.loads((tmp_path / "first_contact.json").read_text())["sections"]
    assert list(sections) == SECTIONS
    for name, section in sections.items():
        assert section["status"] == "skipped" and section["skip_reason"].startswith("time short: "), name