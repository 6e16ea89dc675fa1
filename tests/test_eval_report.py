"""The report command: markdown tables per benchmark, metric and language, and PNG charts that open."""

import json

import pytest

from eval import agreement, alpacaeval, mgsm, report


def write_summary(path, summary):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))


@pytest.fixture
def results(tmp_path):
    for name, (acc_en, acc_de, off_de, win_en, win_de, se_en) in {
        "M0": (0.5, 0.25, 0.125, 20.0, 10.0, 1.5),
        "M1": (0.75, 0.5, 0.0, 30.0, 22.5, 2.0),
    }.items():
        folder = tmp_path / name
        write_summary(folder / "mgsm" / "summary.json", {"benchmark": "mgsm", "languages": {
            "en": {"n": 4, "accuracy": acc_en, "off_target": 0.0},
            "de": {"n": 4, "accuracy": acc_de, "off_target": off_de}}})
        write_summary(folder / "x-alpacaeval" / "judge-gpt-4-1106-preview" / "summary.json", {
            "benchmark": "x-alpacaeval", "judge": "gpt-4-1106-preview", "languages": {
                "en": {"n": 805, "win_rate": win_en, "se": se_en},
                "de": {"n": 805, "win_rate": win_de, "se": 1.0}}})
    # M1 alone has GSM8K results, and only in one language
    write_summary(tmp_path / "M1" / "gsm8k" / "summary.json", {"benchmark": "gsm8k", "languages": {
        "fr": {"n": 10, "accuracy": 0.3, "off_target": 0.1}}})
    return tmp_path


def test_report_tables_and_charts(results, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "report"
    report.main(["--model", f"M0={results / 'M0'}", "--model", f"M1={results / 'M1'}", "--out", str(out), "--paper"])
    text = (out / "report.md").read_text()
    assert "## mgsm: accuracy" in text and "## x-alpacaeval/judge-gpt-4-1106-preview: win rate" in text
    assert "| model | en | de | avg |" in text
    assert "| M0 | 0.500 | 0.250 | 0.375 |" in text
    assert "| M1 | 0.750 | 0.500 | 0.625 |" in text
    assert "| M1 | 0.000 | 0.000 | 0.000 |" in text  # MGSM off-target
    assert "| M0 | 20.00 ± 1.50 | 10.00 ± 1.00 | 15.00 |" in text
    assert "| M1 | 30.00 ± 2.00 | 22.50 ± 1.00 | 26.25 |" in text
    # the paper's rows: docs/method.md §1.9's numbers, on the languages of the table
    assert "| paper M1 (Meta-Llama-3-8B-Instruct) | 0.712 | 0.564 | 0.638 |" in text
    assert "| paper M2 (Meta-Llama-3-8B-Instruct) | 34.09 | 16.02 | 25.05 |" in text
    # a section only one model has: its table has only that model
    gsm = text[text.index("## gsm8k: accuracy"):]
    gsm = gsm[:gsm.index("![")]
    assert "| M1 | 0.300 | 0.300 |" in gsm and "| M0 |" not in gsm
    for png in ("mgsm-accuracy.png", "mgsm-off_target.png", "x-alpacaeval-judge-gpt-4-1106-preview-win_rate.png",
                "gsm8k-accuracy.png"):
        assert f"]({png})" in text
        image = imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0.05  # bars, not a blank canvas


def test_report_without_the_paper_rows_and_bad_arguments(results, tmp_path):
    out = tmp_path / "plain"
    report.main(["--model", f"M0={results / 'M0'}", "--out", str(out)])
    text = (out / "report.md").read_text()
    assert "| paper " not in text and "| M0 | 0.500 | 0.250 | 0.375 |" in text
    with pytest.raises(SystemExit):
        report.main(["--model", "M0", "--out", str(out)])
    with pytest.raises(SystemExit):
        report.main(["--model", f"M0={tmp_path / 'absent'}", "--out", str(out)])
    (results / "M0" / "mgsm" / "summary.json").write_text("{broken")
    with pytest.raises(SystemExit, match="summary.json: not valid JSON"):
        report.main(["--model", f"M0={results / 'M0'}", "--out", str(out)])


@pytest.mark.parametrize("module", [mgsm, alpacaeval, agreement, report])
def test_every_command_explains_itself(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "python -m eval." in capsys.readouterr().out
