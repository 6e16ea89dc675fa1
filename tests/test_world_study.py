"""bench/world_study.py's statistics: the t-interval against scipy's, and paired differences and the noise curve
recomputed by hand from three made-up seeds' results.json."""

import importlib.util
import statistics

import pytest

from helpers import ROOT

spec = importlib.util.spec_from_file_location("world_study", ROOT / "bench" / "world_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


@pytest.mark.parametrize("values", [[0.1, 0.4], [0.3, 0.5, 0.2, 0.9, 0.6], [float(i % 7) for i in range(30)]])
def test_interval_is_scipys_t_interval(values):
    scipy_stats = pytest.importorskip("scipy.stats")
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=statistics.mean(values),
                                       scale=scipy_stats.sem(values))
    cell = study.interval(values)
    assert cell["low"] == pytest.approx(low, abs=2e-3 * (high - low)) and cell["high"] == pytest.approx(high, rel=1e-3)


def results(seed: int) -> dict:
    """One seed's results.json: accuracy = base + a per-model offset, the same in every language but English."""
    offsets = {"M0": 0.0, "M1": 0.5, "M2": 0.6, "SDRRL-1": 0.3, "SDRRL-2": 0.55, "DPO-only-1": 0.45,
               "NLL-only-1": 0.2 + 0.01 * seed, "gold-SFT": 0.7, "pair-noise-0.3-1": -0.1}
    table = {m: {"en": 0.9, **{lang: 0.2 + o for lang in ("es", "fr", "de", "ru")}} for m, o in offsets.items()}
    return {"test": table, "dev": table, "ood": table,
            "pairs": {"1": {"n": 100 + seed, "agreement": 0.99, "accuracy": 0.98},
                      "2": {"n": 50, "agreement": 0.8 + 0.05 * seed, "accuracy": 0.4}},
            "pair_noise": {"0.3": {"model": "pair-noise-0.3-1", "agreement": 0.7 - 0.01 * seed, "accuracy": 0.6}}}


def test_summary_differences_and_noise_curve_by_hand():
    text, data = study.summarize({s: results(s) for s in range(3)}, {}, 0.25)
    lidr_minus_nll = data["differences"]["M1 - NLL-only-1"]["test"]
    assert lidr_minus_nll["values"] == pytest.approx([0.3, 0.29, 0.28])
    assert lidr_minus_nll["mean"] == pytest.approx(0.29)
    half = 4.303 * statistics.stdev([0.3, 0.29, 0.28]) / 3 ** 0.5
    assert lidr_minus_nll["high"] - lidr_minus_nll["mean"] == pytest.approx(half)
    assert data["differences"]["M1 - M0"]["en"]["mean"] == pytest.approx(0.0)
    noise = {level["swapped"]: level["points"] for level in data["noise"]}
    assert [p["gain"] for p in noise[0.3]] == pytest.approx([-0.1] * 3)
    assert [p["agreement"] for p in noise[0.3]] == pytest.approx([0.7, 0.69, 0.68])
    assert [p["gain"] for p in noise[0.0]] == pytest.approx([0.5] * 3)
    assert "| M1 − NLL-only-1 | **+0.290 [" in text


def test_summary_pairs_against_gold_over_seeds():
    text, data = study.summarize({s: results(s) for s in range(3)}, {}, 0.25)
    assert data["pairs"]["1"]["n"]["values"] == [100, 101, 102]
    second = data["pairs"]["2"]["agreement"]
    assert second["values"] == pytest.approx([0.8, 0.85, 0.9]) and second["mean"] == pytest.approx(0.85)
    assert second["high"] - second["mean"] == pytest.approx(4.303 * 0.05 / 3 ** 0.5)
    assert "| 2 | 50 [50, 50] | 0.400 [0.400, 0.400] | **0.850 [" in text
