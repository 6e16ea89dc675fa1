"""bench/world_study.py's statistics: the t-interval and the exact sign-flip test against scipy's, paired
differences, the noise curve and the noise split recomputed by hand from made-up seeds' results.json, and the
tuning's choice (world/tune.py) from made-up dev accuracies; the demo's table of one seed beside the committed
study (world/report.py study_markdown)."""

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


@pytest.mark.parametrize("differences", [[0.1, 0.2, 0.3, 0.1, 0.05], [-0.137, 0.041, 0.1, 0.05, 0.2],
                                         [0.3, -0.1, 0.0, 0.2, -0.05, 0.15, 0.01, -0.2, 0.4, 0.02]])
def test_sign_flip_p_is_scipys_exact_permutation_test(differences):
    np = pytest.importorskip("numpy")
    scipy_stats = pytest.importorskip("scipy.stats")
    exact = scipy_stats.permutation_test((np.array(differences),), np.mean, permutation_type="samples",
                                         n_resamples=np.inf, alternative="two-sided")
    assert study.sign_flip_p(differences) == pytest.approx(exact.pvalue)


def test_sign_flip_p_by_hand():
    assert study.sign_flip_p([0.1] * 5) == pytest.approx(2 / 32)  # all five one way: the smallest p of five seeds
    assert study.sign_flip_p([0.1, 0.2, 0.1, 0.3, 0.0]) == pytest.approx(2 / 16)  # a tie flips to itself
    cell = study.paired([0.1, -0.2, 0.0, 0.3])
    assert (cell["wins"], cell["losses"], cell["ties"]) == (2, 1, 1)


def results(seed: int) -> dict:
    """One seed's results.json: accuracy = base + a per-model offset, the same in every language but English."""
    offsets = {"M0": 0.0, "M1": 0.5, "M2": 0.6, "SDRRL-1": 0.3, "SDRRL-2": 0.55, "DPO-only-1": 0.45,
               "NLL-only-1": 0.2 + 0.01 * seed, "gold-SFT": 0.7, "pair-noise-0.3-1": -0.1,
               "pair-noise-0.3-dpo-only": 0.1 - 0.02 * seed, "pair-noise-0.3-nll-only": -0.2}
    table = {m: {"en": 0.9, **{lang: 0.2 + o for lang in ("es", "fr", "de", "ru")}} for m, o in offsets.items()}
    return {"test": table, "dev": table, "ood": table,
            # per direction: es a weak language's pairs, en<-es and en<-fr the English (dominant) ones
            "pairs": {"1": {"n": 100 + seed, "agreement": 0.99, "accuracy": 0.98, "per_language": {
                "es": {"kinds": {"right>wrong": 9, "both right": 1}},
                "en<-es": {"kinds": {"right>wrong": 4, "wrong>right": 1, "both wrong": 1}},
                "en<-fr": {"kinds": {"right>wrong": 2 + seed, "wrong>right": 1 - seed % 2, "both right": 1}}}},
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


def test_english_pairs_are_the_dominant_directions_alone():
    english = [study.english_pairs(results(seed)["pairs"]["1"]) for seed in (0, 1)]
    assert english[0] == {"n": 10, "accuracy": 0.6, "agreement": 0.75}  # 6 right of 10; 6 of the 8 told apart
    assert english[1] == {"n": 10, "accuracy": 0.7, "agreement": 7 / 8}
    text, data = study.summarize({s: results(s) for s in range(2)}, {}, 0.25, {s: results(s) for s in range(2)}, 0.25)
    assert data["pairs"]["1"]["english_agreement"]["values"] == [0.75, 7 / 8]
    assert data["slip"]["pairs"]["english"]["accuracy"]["mean"] == pytest.approx(0.65)
    assert "| 1 | 100 [" in text and "| 0.650 [" in text


def test_summary_pairs_against_gold_over_seeds():
    text, data = study.summarize({s: results(s) for s in range(3)}, {}, 0.25)
    assert data["pairs"]["1"]["n"]["values"] == [100, 101, 102]
    second = data["pairs"]["2"]["agreement"]
    assert second["values"] == pytest.approx([0.8, 0.85, 0.9]) and second["mean"] == pytest.approx(0.85)
    assert second["high"] - second["mean"] == pytest.approx(4.303 * 0.05 / 3 ** 0.5)
    assert "| 2 | 50 [50, 50] | 0.400 [0.400, 0.400] | **0.850 [" in text


def test_summary_noise_split_and_sign_flip_p_by_hand():
    text, data = study.summarize({s: results(s) for s in range(3)}, {}, 0.25)
    split = data["noise_split"]["pair-noise-0.3-dpo-only - pair-noise-0.3-nll-only"]["test"]
    assert split["values"] == pytest.approx([0.3, 0.28, 0.26]) and split["p"] == pytest.approx(2 / 8)
    assert data["noise_split"]["pair-noise-0.3-nll-only - NLL-only-1"]["test"]["values"] == pytest.approx(
        [-0.4, -0.41, -0.42])
    assert data["differences"]["M1 - NLL-only-1"]["test"]["p"] == pytest.approx(0.25)
    assert "| pair-noise-0.3-dpo-only − pair-noise-0.3-nll-only | **+0.280 [" in text and "p = 0.25 (3+/0−/0=)" in text


def test_tuning_chooses_the_best_mean_dev_setting_first_on_ties():
    from world.tune import GRID, choose, tag

    def dev(arm_scores: dict) -> dict:  # every grid point 0.1 unless given; the same in the four languages
        out = {"M0": {lang: 0.0 for lang in ("en", "es", "fr", "de", "ru")}}
        for arm, settings in GRID.items():
            for s in settings:
                score = arm_scores.get((arm, tag(s)), 0.1)
                out[f"{arm}-{tag(s)}"] = {"en": 1.0, **{lang: score for lang in ("es", "fr", "de", "ru")}}
        return out

    nll = [tag(s) for s in GRID["nll-only"]]
    seed0 = dev({("nll-only", nll[1]): 0.9, ("nll-only", nll[2]): 0.5, ("lidr", tag(GRID["lidr"][3])): 0.4})
    seed1 = dev({("nll-only", nll[1]): 0.1, ("nll-only", nll[2]): 0.6, ("lidr", tag(GRID["lidr"][3])): 0.4})
    chosen = choose({0: seed0, 1: seed1})
    assert chosen["nll-only"]["setting"] == GRID["nll-only"][2]  # mean 0.55 beats 0.5: the mean, not one seed's best
    assert chosen["nll-only"]["dev_mean"] == pytest.approx(0.55)
    assert chosen["lidr"]["setting"] == GRID["lidr"][3]
    assert chosen["sdrrl"]["setting"] == GRID["sdrrl"][0]  # all equal: the first in the grid's order
    ablation = {seed: {name: acc for name, acc in d.items() if not name.startswith(("sdrrl", "gold-sft"))}
                for seed, d in ((0, seed0), (1, seed1))}  # world.tune --arms lidr dpo-only nll-only
    assert choose(ablation) == {arm: chosen[arm] for arm in ("lidr", "dpo-only", "nll-only")}


def test_tune_sampled_tunes_the_sampled_worlds_ablation_and_tests_at_its_choice(tmp_path):
    """--tune-sampled: world.tune on the sampled world's dials for M1, DPO only and NLL only, then (once its
    tuned.json exists) the test seeds at that choice in their own folders, summarized as a section of their own."""
    import argparse
    import json

    args = argparse.Namespace(work=tmp_path, seeds=[100], tune_seeds=[0, 1], pair_noise=[], slip_rate=0.0,
                              all_arms=False, english_error_rate=0.0, temperature=1.0, soft_rate=0.3, samples=2)
    tune = study.tune_jobs(args, sampled=True)
    assert [work.relative_to(tmp_path).as_posix() for work, _, _ in tune] == ["sampled/tune/seed0", "sampled/tune/seed1"]
    flags = tune[0][1]
    assert flags[:4] == ["-m", "world.tune", "--seed", "0"] and flags[flags.index("--arms") + 1:][:3] == [
        "lidr", "dpo-only", "nll-only"] and flags[-6:] == study.sampled_flags(args)
    assert [w.relative_to(tmp_path).as_posix() for w, _, _ in study.jobs_for(args)] == ["seed100", "sampled/seed100"]
    (tmp_path / "sampled").mkdir()
    (tmp_path / "sampled" / "tuned.json").write_text(json.dumps({"chosen": {}}))
    jobs = study.jobs_for(args)
    assert jobs[-1][0] == tmp_path / "sampled" / "tuned" / "seed100"
    assert jobs[-1][1][jobs[-1][1].index("--tuned") + 1] == str(tmp_path / "sampled" / "tuned.json")
    text, data = study.summarize({s: results(s) for s in range(2)}, {}, 0.0, None, 0.0, None, "dials",
                                 {s: results(s) for s in range(2)})
    assert "every arm at the setting chosen on this world's dev (dials; seeds 0, 1)" in text
    assert data["sampled_retuned"]["differences"]["M1 - NLL-only-1"]["test"]["values"] == pytest.approx([0.3, 0.29])


def test_a_run_that_ended_before_m2_leaves_m2_to_the_seeds_that_made_it():
    """A seed whose LIDR run ended at M1 (iteration 2 made no pairs) has no M2: M2's cells and its differences
    are over the other seeds, said in the row; every other arm and difference is over all seeds."""
    runs = {s: results(s) for s in range(4)}
    for table in ("test", "dev", "ood"):
        runs[3][table] = {m: acc for m, acc in runs[3][table].items() if m not in ("M2", "SDRRL-2")}
    runs[3]["test"]["M1"] = {lang: 0.5 for lang in ("en", "es", "fr", "de", "ru")}  # what M2 − M1 must not see
    text, data = study.summarize(runs, {}, 0.25)
    assert data["arms"]["M2"]["test"]["n"] == 3 and data["arms"]["M1"]["test"]["n"] == 4
    assert data["differences"]["M2 - M1"]["test"]["values"] == pytest.approx([0.1] * 3)
    assert data["differences"]["M2 - M1"]["seeds"] == [0, 1, 2] and "seeds" not in data["differences"]["M1 - M0"]
    assert "| M2 (3 of 4 seeds) |" in text and "| M2 − M1 (3 of 4 seeds) | **+0.100 [" in text
    assert "| M1 − M0 | " in text


def test_summary_of_test_only_runs_and_the_slip_world():
    """The study's default test runs are evaluated on test alone (--eval-splits test): no dev or ood columns."""
    only_test = {s: {k: v for k, v in results(s).items() if k not in ("dev", "ood")} for s in range(3)}
    text, data = study.summarize(only_test, {}, 0.0, only_test, 0.25)
    assert set(data["arms"]["M1"]) == {"en", "test"} and "avg (dev)" not in text.split("### English slipping")[0]
    assert set(data["differences"]["M1 - NLL-only-1"]) == {"test", "en"}
    slip = data["slip"]["differences"]["DPO-only-1 - NLL-only-1"]["test"]
    assert slip["values"] == pytest.approx([0.25, 0.24, 0.23]) and slip["p"] == pytest.approx(0.25)


def test_a_demo_seed_beside_the_study_is_the_studys_own_difference_for_that_seed():
    """The demo's "this seed beside the study" table (world.report.study_markdown) for seed 100 of the committed
    study gives, in its "this run" column, the paired differences the study computed for seed 100, and the
    study's cells as the study wrote them."""
    import json

    from world.report import study_markdown

    summary = json.loads((ROOT / "bench" / "world_study" / "summary.json").read_text())
    test = json.loads((ROOT / "bench" / "world_study" / "seed100" / "report" / "results.json").read_text())["test"]
    rows = [line.split(" | ") for line in study_markdown(test, summary, "s").splitlines()
            if line.startswith(("| M", "| gold"))]
    assert [row[0].strip("| ") for row in rows][:4] == ["M1 − M0", "M2 − M1", "M1 − NLL-only-1", "M1 − DPO-only-1"]
    assert len(rows) == len(summary["differences"]) == 7  # seed 100 made every arm
    for row, cells in zip(rows, summary["differences"].values()):
        cell, seed = cells["test"], cells.get("seeds", summary["seeds"]).index(100)  # M2: 8 seeds made it
        assert row[1] == f"{cell['values'][seed]:+.3f}"  # the same sum, so the same float
        assert row[2] == f"{cell['mean']:+.3f} [{cell['low']:+.3f}, {cell['high']:+.3f}]"
        assert row[4].rstrip(" |") == f"{cell['wins']} / {cell['losses']} of {cell['n']}"
    del test["DPO-only-1"]  # an arm this run did not make: its row is left out
    assert "DPO-only-1" not in study_markdown(test, summary, "s")


def test_the_demo_appends_the_table_to_its_report_and_says_when_the_study_is_missing(tmp_path, monkeypatch, capsys):
    import json

    import demo
    from world.report import study_markdown

    summary = json.loads(demo.STUDY.read_text())
    test = json.loads((ROOT / "bench" / "world_study" / "seed101" / "report" / "results.json").read_text())["test"]
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("# the run's report\n")
    demo.beside_the_study({"test": test}, tmp_path)
    table = study_markdown(test, summary, "bench/world_study/summary.json")
    assert (tmp_path / "report" / "report.md").read_text() == "# the run's report\n\n" + table
    assert table in capsys.readouterr().out
    monkeypatch.setattr(demo, "STUDY", tmp_path / "no-study" / "summary.json")  # a clone without the study's files
    demo.beside_the_study({"test": test}, tmp_path)
    assert (tmp_path / "report" / "report.md").read_text() == "# the run's report\n\n" + table
    assert "not found: the report does not compare" in capsys.readouterr().out


def test_all_arms_resumes_each_main_run_in_its_folder_and_waits_for_gold_sft(tmp_path):
    """--all-arms adds every arm to each seed's main run in the same folder (the finished arms are kept), so a
    main run that has only the ablation is not finished for it; the slip world keeps the ablation."""
    import argparse
    import json

    args = argparse.Namespace(work=tmp_path, seeds=[100, 101], pair_noise=[0.3], slip_rate=0.25, all_arms=True,
                              english_error_rate=0.0, temperature=1.0, soft_rate=0.3, samples=2)
    jobs = study.jobs_for(args)
    assert [(work.relative_to(tmp_path).as_posix(), arm) for work, _, arm in jobs] == [
        ("seed100", "gold-SFT"), ("seed101", "gold-SFT"), ("slip/seed100", "NLL-only-1"), ("slip/seed101", "NLL-only-1"),
        ("sampled/seed100", "NLL-only-1"), ("sampled/seed101", "NLL-only-1")]
    assert "--ablations-only" not in jobs[0][1] and "--noise-split" in jobs[0][1]
    assert "--ablations-only" in jobs[2][1] and "--english-slip-rate" in jobs[2][1]
    sampled = jobs[4][1]  # the sampled world: the ablation, soft English errors, answers at a temperature, 2 per prompt
    assert "--ablations-only" in sampled and sampled[sampled.index("--english-soft-error-rate") + 1] == "0.3"
    assert sampled[sampled.index("--temperature") + 1] == "1.0" and sampled[sampled.index("--samples") + 1] == "2"
    report = tmp_path / "seed100" / "report"
    report.mkdir(parents=True)
    (report / "results.json").write_text(json.dumps({"test": {"M0": {}, "M1": {}, "NLL-only-1": {}}}))
    assert study.finished(tmp_path / "seed100", "NLL-only-1") and not study.finished(tmp_path / "seed100", "gold-SFT")
    assert not study.finished(tmp_path / "seed101", "NLL-only-1")
    ablation = study.jobs_for(argparse.Namespace(**{**vars(args), "all_arms": False}))
    assert [arm for _, _, arm in ablation] == ["NLL-only-1"] * 6 and "--ablations-only" in ablation[0][1]


def test_the_sampled_world_reports_greedy_and_sampled_columns_by_hand():
    """The sampled world's runs carry test-sampled beside test: each arm and difference in the four columns, the
    sampled ones recomputed from made-up numbers, and its pairs' English share from the dominant directions."""
    def sampled(seed):
        r = results(seed)
        r["test-sampled"] = {m: {lang: v / 2 + (0.01 * seed if m == "M1" and lang == "en" else 0.0)
                                 for lang, v in acc.items()} for m, acc in r["test"].items()}
        return r

    text, data = study.summarize({s: results(s) for s in range(3)}, {}, 0.0, None, 0.0,
                                 {s: sampled(s) for s in range(3)}, "--temperature 1")
    section = data["sampled"]
    assert set(section["arms"]["M1"]) == {"test", "en", "sampled", "sampled en"}
    assert section["arms"]["M1"]["sampled en"]["values"] == pytest.approx([0.45, 0.46, 0.47])
    difference = section["differences"]["M1 - NLL-only-1"]
    assert difference["sampled"]["values"] == pytest.approx([0.15, 0.145, 0.14])  # (0.5 - (0.2 + 0.01 s)) / 2
    assert difference["sampled en"]["values"] == pytest.approx([0.0, 0.01, 0.02])
    assert difference["test"]["values"] == pytest.approx([0.3, 0.29, 0.28])
    english = [study.english_pairs(results(s)["pairs"]["1"])["agreement"] for s in range(3)]
    assert section["pairs"]["english"]["agreement"]["values"] == pytest.approx(english)
    assert "### Sampled answers (--temperature 1; seeds 0, 1, 2)" in text
    assert "| difference | avg (test) | en (test) | avg (test-sampled) | en (test-sampled) |" in text
