"""X-AlpacaEval's verdicts exported in alpaca_eval's annotations format, read by alpaca_eval itself: its raw win
rate equals lidr's, and its length-controlled win rate is the one the summary reports (or the summary says why not)."""

import importlib.metadata
import importlib.util
import json
import sys
import types

import pytest

from eval import alpacaeval


class LengthJudge:
    """P(the second output is better) 0.9 when it is the longer one, else 0.3."""

    name = "length"

    def prefer_second(self, triples, progress=True):
        return [0.9 if len(M) > len(m) else 0.3 for _, m, M in triples]

    def close(self):
        pass


@pytest.fixture
def alpaca_eval(monkeypatch):
    """alpaca_eval's metrics; alpaca_eval 0.6.6 imports pkg_resources, which setuptools 81 and later no longer
    ship, so the test gives it the two functions it calls (packaging's version parser, importlib's metadata).
    The modules imported here are forgotten afterwards, so other tests see the environment as it is."""
    if importlib.util.find_spec("alpaca_eval") is None:
        pytest.skip("the length-controlled win rate needs pip install 'lidr[alpacaeval]'")
    if importlib.util.find_spec("pkg_resources") is None:
        from packaging.version import parse

        monkeypatch.setitem(sys.modules, "pkg_resources", types.SimpleNamespace(
            parse_version=parse, get_distribution=lambda name: types.SimpleNamespace(
                version=importlib.metadata.version(name))))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    from alpaca_eval.metrics import glm_winrate, winrate

    yield types.SimpleNamespace(get_winrate=winrate.get_winrate,
                                get_length_controlled_winrate=glm_winrate.get_length_controlled_winrate)
    for name in [m for m in sys.modules if m == "alpaca_eval" or m.startswith("alpaca_eval.")]:
        del sys.modules[name]


def judged(tmp_path):
    outputs, reference = tmp_path / "outputs", tmp_path / "reference"
    instructions = [f"Question {i}?" for i in range(8)]
    outputs.mkdir()
    reference.mkdir()
    (outputs / "es.json").write_text(json.dumps([
        {"generator": "M1", "dataset": "d", "id": str(i), "instruction": q, "output": "respuesta " * (1 + i % 3)}
        for i, q in enumerate(instructions) if i != 2]))  # item 2 has no output
    (reference / "es.json").write_text(json.dumps([
        {"generator": "gpt-4", "dataset": "d", "id": str(i), "instruction": q, "output": "referencia " * 2}
        for i, q in enumerate(instructions)]))
    summary = alpacaeval.judge_outputs(LengthJudge(), outputs, reference, ["es"], tmp_path / "judged",
                                       both_orders=False, judge_name="length")
    return summary["languages"]["es"], json.loads((tmp_path / "judged" / "es.annotations.json").read_text())


def test_annotations_are_alpaca_evals_format_and_give_its_win_rate(tmp_path, alpaca_eval):
    summary, annotations = judged(tmp_path)
    assert len(annotations) == summary["n"] == 7
    first = annotations[0]
    assert set(first) == {"instruction", "output_1", "generator_1", "output_2", "generator_2", "annotator", "preference",
                          "index"}
    assert first["output_1"] == "referencia referencia " and first["output_2"] == "respuesta "
    assert [a["index"] for a in annotations] == [0, 1, 3, 4, 5, 6, 7]  # the position in the reference file
    theirs = alpaca_eval.get_winrate(annotations)
    assert theirs["n_total"] == 7
    assert theirs["win_rate"] == pytest.approx(summary["win_rate"], abs=1e-9)
    assert theirs["standard_error"] == pytest.approx(summary["se"], rel=1e-9)


def test_the_length_controlled_win_rate_is_alpaca_evals(tmp_path, alpaca_eval):
    summary, annotations = judged(tmp_path)
    if summary["lc_win_rate"] is None:
        assert summary["lc_note"].startswith("no length-controlled win rate: alpaca_eval's GLM failed (")
        pytest.skip(f"alpaca_eval's GLM reads df_gamed.csv from the Hugging Face Hub, unreachable here: "
                    f"{summary['lc_note']}")
    theirs = alpaca_eval.get_length_controlled_winrate(annotations, save_weights_dir=None)
    assert summary["lc_win_rate"] == pytest.approx(theirs["length_controlled_winrate"])
    assert summary["lc_se"] == pytest.approx(theirs["lc_standard_error"])


def test_without_alpaca_eval_the_summary_says_how_to_get_it(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "alpaca_eval" else
                        real_find_spec(name, *a))
    summary, _ = judged(tmp_path)
    assert summary["lc_win_rate"] is None
    assert summary["lc_note"] == "no length-controlled win rate: pip install 'lidr[alpacaeval]'"
    assert summary["n"] == 7 and summary["win_rate"] is not None  # the raw win rate does not need it


def test_the_report_shows_the_length_controlled_win_rate_beside_the_raw_one():
    from eval.report import build_tables, markdown_table

    summary = {"languages": {"es": {"n": 7, "win_rate": 40.0, "se": 5.0, "lc_win_rate": 35.5, "lc_se": 1.25},
                             "fr": {"n": 7, "win_rate": 30.0, "se": 4.0, "lc_win_rate": None, "lc_note": "offline"}}}
    tables = build_tables({"M1": {"x-alpacaeval/judge-length": summary}}, paper=False)
    assert [t["metric"] for t in tables] == ["win_rate", "lc_win_rate"]
    assert markdown_table(tables[1]).splitlines()[2] == "| M1 | 35.50 ± 1.25 | 35.50 |"
