"""X-AlpacaEval's verdicts exported in alpaca_eval's annotations format, read by alpaca_eval itself: its raw win
rate equals lidr's, and its length-controlled win rate is the one the summary reports (or the summary says why not).
alpaca_eval's GLM reads df_gamed.csv (two length-gamed baselines per instruction) from the Hugging Face Hub: offline,
the tests hand it a file of the same columns built here, and its own code does the rest."""

import importlib.metadata
import importlib.util
import json
import math
import sys
import types

import pandas as pd
import pytest

from eval import alpacaeval

# alpaca_eval 0.6.6 calls scikit-learn's LogisticRegressionCV with arguments newer versions deprecate
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:sklearn")


class LengthJudge:
    """P(the second output is better) 0.9 when it is the longer one, else 0.3."""

    name = "length"

    def prefer_second(self, triples, progress=True):
        return [0.9 if len(M) > len(m) else 0.3 for _, m, M in triples]

    def close(self):
        pass


class SmoothLengthJudge(LengthJudge):
    """P(the second output is better) = 0.5 + 0.4·tanh((|M| − |m|) / 20): the model's chance of winning is the same
    whichever side it is shown on, so the test knows every verdict without knowing the order lidr asked in."""

    def prefer_second(self, triples, progress=True):
        return [model_wins(len(M), len(m)) for _, m, M in triples]


def model_wins(own_length: int, other_length: int) -> float:
    return 0.5 + 0.4 * math.tanh((own_length - other_length) / 20)


def gamed_baselines(n: int) -> pd.DataFrame:
    """df_gamed.csv as alpaca_eval's GLM reads it (model, index, instruction_difficulty, preference, std_delta_len,
    not_gamed_baseline): a verbose and a concise baseline per instruction, each winning by its length."""
    rows = []
    for model, sign in (("gamed_verbose", -1.0), ("gamed_concise", 1.0)):  # std_delta_len: reference minus model
        for i in range(n):
            delta = sign * (0.5 + (i % 4) / 2)
            rows.append({"model": model, "index": i, "instruction_difficulty": math.sin(i), "std_delta_len": delta,
                         "preference": 0.5 - 0.4 * math.tanh(delta) + 0.05 * math.sin(i), "not_gamed_baseline": False})
    return pd.DataFrame(rows)


@pytest.fixture
def alpaca_eval(monkeypatch, tmp_path):
    """alpaca_eval's metrics; alpaca_eval 0.6.6 imports pkg_resources, which setuptools 81 and later no longer
    ship, so the test gives it the two functions it calls (packaging's version parser, importlib's metadata).
    Its one download, df_gamed.csv, is a local file (gamed_baselines). The modules imported here are forgotten
    afterwards, so other tests see the environment as it is."""
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

    downloads = []

    def local_hub_file(repo_id, filename, **kwargs):
        downloads.append((repo_id, filename))
        assert (repo_id, filename) == ("tatsu-lab/alpaca_eval", "df_gamed.csv")
        gamed_baselines(N_LC).to_csv(tmp_path / filename, index=False)
        return str(tmp_path / filename)

    monkeypatch.setattr(glm_winrate, "hf_hub_download", local_hub_file)
    yield types.SimpleNamespace(downloads=downloads, get_winrate=winrate.get_winrate,
                                get_length_controlled_winrate=glm_winrate.get_length_controlled_winrate)
    for name in [m for m in sys.modules if m == "alpaca_eval" or m.startswith("alpaca_eval.")]:
        del sys.modules[name]


N_LC = 40  # instructions in the length-controlled test: enough for the GLM's 5-fold cross-validation to fit


def model_output(i: int) -> str:
    return "respuesta " * (1 + i % 3) + "muy " * (i % 7)


def judged(tmp_path, judge=LengthJudge(), n=8):
    outputs, reference = tmp_path / "outputs", tmp_path / "reference"
    instructions = [f"Question {i}?" for i in range(n)]
    outputs.mkdir()
    reference.mkdir()
    (outputs / "es.json").write_text(json.dumps([
        {"generator": "M1", "dataset": "d", "id": str(i), "instruction": q, "output": "respuesta " * (1 + i % 3)}
        if n == 8 else {"generator": "M1", "dataset": "d", "id": str(i), "instruction": q, "output": model_output(i)}
        for i, q in enumerate(instructions) if i != 2]))  # item 2 has no output
    (reference / "es.json").write_text(json.dumps([
        {"generator": "gpt-4", "dataset": "d", "id": str(i), "instruction": q, "output": "referencia " * 2}
        for i, q in enumerate(instructions)]))
    summary = alpacaeval.judge_outputs(judge, outputs, reference, ["es"], tmp_path / "judged",
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
    """The summary's LC win rate is alpaca_eval's GLM on annotations built here from the inputs and the judge's
    rule (not read from lidr's export): reference as output_1, the model's output as output_2, P(model wins) + 1."""
    summary, _ = judged(tmp_path, SmoothLengthJudge(), n=N_LC)
    reference = "referencia " * 2
    ours = pd.DataFrame([{"instruction": f"Question {i}?", "output_1": reference, "generator_1": "reference-es",
                          "output_2": model_output(i), "generator_2": "model-es", "annotator": "length",
                          "preference": 1 + model_wins(len(model_output(i)), len(reference)), "index": i}
                         for i in range(N_LC) if i != 2])
    theirs = alpaca_eval.get_length_controlled_winrate(ours, save_weights_dir=None)
    assert alpaca_eval.downloads == [("tatsu-lab/alpaca_eval", "df_gamed.csv")] * 2  # lidr's call, then ours
    assert summary["n"] == N_LC - 1 and summary["win_rate"] == pytest.approx(theirs["win_rate"])
    assert theirs["lc_standard_error"] > 0  # the GLM fitted a length effect: not a constant prediction
    assert summary["lc_win_rate"] == pytest.approx(theirs["length_controlled_winrate"], rel=1e-9)
    assert summary["lc_se"] == pytest.approx(theirs["lc_standard_error"], rel=1e-9)
    assert abs(summary["lc_win_rate"] - summary["win_rate"]) > 1  # and it differs from the raw win rate


def test_without_the_hub_the_summary_says_why_there_is_no_length_controlled_win_rate(tmp_path, alpaca_eval,
                                                                                      monkeypatch):
    from alpaca_eval.metrics import glm_winrate

    def unreachable(repo_id, filename, **kwargs):
        raise OSError("the Hub is unreachable")  # what huggingface_hub raises offline is an OSError

    monkeypatch.setattr(glm_winrate, "hf_hub_download", unreachable)
    summary, _ = judged(tmp_path)
    assert summary["lc_win_rate"] is None and summary["win_rate"] is not None
    assert summary["lc_note"] == ("no length-controlled win rate: alpaca_eval's GLM failed "
                                  "(OSError: the Hub is unreachable)")


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
