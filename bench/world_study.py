"""The controlled world as a study: every arm tuned on dev, fresh test seeds, intervals and exact tests.

    python bench/world_study.py --tune                   # tune on seeds 0, 1 (dev), then test seeds 100-109
    python bench/world_study.py --summarize-only         # the tables and the plot again from finished runs
    python bench/world_study.py --seeds 0 1 2 3 4 --all-arms --pair-noise 0.1 0.2 0.3 0.4   # the earlier study

--tune first runs `python -m world.tune` per tuning seed (the world, M0, LIDR's iteration-1 pairs, then one
iteration of every arm at every point of its grid, on dev only) and writes WORK/tuned.json: per arm the
setting with the best mean dev accuracy over the tuning seeds. Then, per test seed, demo.py runs (one thread,
--jobs seeds at a time; `--tuned WORK/tuned.json` when it exists):
- WORK/seedN: M0, M1 (one LIDR iteration), DPO only, NLL only on test (--all-arms adds every arm, and OOD),
  and at each --pair-noise share LIDR, DPO only and NLL only on the same swapped pairs (--noise-split);
- WORK/slip/seedN: the same arms in a world whose English slips in --slip-rate of its cells;
- WORK/sampled/seedN: the same arms in a world whose English errs softly (--soft-rate of its answers, at random)
  and whose answers are sampled at --temperature, --samples per prompt, every model also scored on sampled test;
- WORK/english-imperfect/seedN (--english-error-rate > 0): M0, M1, M2 in a world whose English misreads.
A run whose report/results.json holds its arms is skipped; an interrupted one resumes. Then, on test: each arm's mean
and 95% t-interval over seeds; paired differences with the two-sided exact sign-flip test and the seeds won,
lost and tied; the noise split; the slip world; the gain against pair agreement (WORK/noise.png). Written to
WORK/summary.md and WORK/summary.json; bench/RESULTS.md holds the decision rule, written before the runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lidr.harness.outputs import write_json_atomic, write_text_atomic  # noqa: E402

LANGS = ["en", "es", "fr", "de", "ru"]
OTHERS = LANGS[1:]
ARMS = ["M0", "M1", "M2", "SDRRL-1", "SDRRL-2", "DPO-only-1", "NLL-only-1", "gold-SFT"]
DIFFERENCES = [("M1", "M0"), ("M2", "M1"), ("M1", "NLL-only-1"), ("M1", "DPO-only-1"), ("M1", "SDRRL-1"),
               ("M2", "SDRRL-2"), ("gold-SFT", "M2")]
PAPER_AGREEMENT = (0.57, 0.79)  # the paper's agreement of its pairs with a GPT-4 judge (docs/method.md §1.9)
# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval over seeds (half-width 0 with one seed)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": len(values), "values": values}
    if len(values) - 1 > len(T95):
        raise ValueError(f"{len(values)} seeds: the t table here stops at {len(T95) + 1}")
    half = T95[len(values) - 2] * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values), "values": values}


def sign_flip_p(differences: list[float]) -> float:
    """Two-sided exact sign-flip test of a zero mean paired difference: the share of the 2^n ways to flip the
    signs of the n differences whose |sum| is at least the observed one (a zero difference flips to itself)."""
    import numpy as np

    if len(differences) > 20:
        raise ValueError(f"{len(differences)} seeds: the exact test enumerates 2^n sign flips, n <= 20 here")
    d = np.asarray(differences, dtype=np.float64)
    signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
    sums = np.abs(signs @ d)
    return float(np.mean(sums >= abs(d.sum()) - 1e-12))


def paired(values: list[float]) -> dict:
    """A paired difference over seeds: its t-interval, the exact sign-flip p and the seeds it won, lost, tied."""
    return {**interval(values), "p": sign_flip_p(values), "wins": sum(v > 0 for v in values),
            "losses": sum(v < 0 for v in values), "ties": sum(v == 0 for v in values)}


def show(cell: dict) -> str:
    return f"{cell['mean']:+.3f} [{cell['low']:+.3f}, {cell['high']:+.3f}]"


def show_paired(cell: dict) -> str:
    return f"{show(cell)}, p = {cell['p']:.3g} ({cell['wins']}+/{cell['losses']}−/{cell['ties']}=)"


def show_level(cell: dict) -> str:
    return f"{cell['mean']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def non_dominant(accuracy: dict) -> float:
    return sum(accuracy[lang] for lang in OTHERS) / len(OTHERS)


def english_pairs(pairs: dict) -> dict:
    """Accuracy and agreement with gold of the dominant pairs alone (en<-l: y_en chosen over y_l→en, the pairs
    that train English), scored by world/report.py's `scores` from its per-direction kinds."""
    from collections import Counter

    from world.report import scores

    kinds = Counter()
    for direction, scored in pairs["per_language"].items():
        if direction.startswith("en<-"):
            kinds.update(scored["kinds"])
    return {key: scores(kinds)[key] for key in ("n", "accuracy", "agreement")}


# -----------------------------------------------------------------------------
# running the seeds


def jobs_for(args) -> list[tuple[Path, list[str], str]]:
    """The test runs as (folder, demo.py's flags, the arm whose results mark it finished), every seed's main run
    first (the primary comparisons), then the dials' worlds: per seed M0, M1, DPO only and NLL only (at the tuned
    settings when --tune ran) with the noise arms; the slip world with the same arms; the English-imperfect world,
    LIDR only. --all-arms adds M2, SDRRL, gold-SFT and the OOD evaluations to each seed's main run, in its own
    folder: what is finished there is kept (the demo resumes), so the primary comparisons do not change."""
    noise = ["--pair-noise", *map(str, args.pair_noise), "--noise-split"] if args.pair_noise else []
    # one process per seed (--jobs 1: the study runs --jobs seeds at a time)
    common = ["--jobs", "1", *(["--tuned", str(args.work / "tuned.json")] if (args.work / "tuned.json").exists() else [])]
    ablation = ["--ablations-only", "--eval-splits", "test"]
    main_arms, last = ([], "gold-SFT") if args.all_arms else (ablation, "NLL-only-1")
    jobs = [(args.work / f"seed{seed}", ["--seed", str(seed), *common, *main_arms, *noise], last)
            for seed in args.seeds]
    if args.slip_rate:
        jobs += [(args.work / "slip" / f"seed{seed}",
                  ["--seed", str(seed), *common, *ablation, "--english-slip-rate", str(args.slip_rate)], "NLL-only-1")
                 for seed in args.seeds]
    if args.temperature:
        jobs += [(args.work / "sampled" / f"seed{seed}", ["--seed", str(seed), *common, *ablation, *sampled_flags(args)],
                  "NLL-only-1") for seed in args.seeds]
    if args.temperature and (args.work / "sampled" / "tuned.json").exists():  # --tune-sampled chose these settings
        retuned = ["--jobs", "1", "--tuned", str(args.work / "sampled" / "tuned.json")]
        jobs += [(args.work / "sampled" / "tuned" / f"seed{seed}",
                  ["--seed", str(seed), *retuned, *ablation, *sampled_flags(args)], "NLL-only-1") for seed in args.seeds]
    if args.english_error_rate:
        jobs += [(args.work / "english-imperfect" / f"seed{seed}",
                  ["--seed", str(seed), *common, "--only-lidr", "--english-error-rate", str(args.english_error_rate)],
                  "M2")
                 for seed in args.seeds]
    return jobs


def sampled_flags(args) -> list[str]:
    """demo.py's flags of the sampled world: soft English errors, answers at a temperature, samples per prompt."""
    return ["--english-soft-error-rate", str(args.soft_rate), "--temperature", str(args.temperature),
            "--samples", str(args.samples)]


def tune_jobs(args, sampled: bool = False) -> list[tuple[Path, list[str], str]]:
    """world/tune.py per tuning seed; sampled: the sampled world's, its ablation arms alone, in WORK/sampled/tune."""
    if sampled:
        return [(args.work / "sampled" / "tune" / f"seed{seed}",
                 ["-m", "world.tune", "--seed", str(seed), "--arms", "lidr", "dpo-only", "nll-only",
                  *sampled_flags(args)], "") for seed in args.tune_seeds]
    return [(args.work / "tune" / f"seed{seed}", ["-m", "world.tune", "--seed", str(seed)], "")
            for seed in args.tune_seeds]


def finished(work: Path, arm: str) -> bool:
    """A tuning job (arm ""): WORK/dev.json exists; a demo run: its report/results.json has `arm` on test."""
    if not arm:
        return (work / "dev.json").is_file()
    results = work / "report" / "results.json"
    return results.is_file() and arm in json.loads(results.read_text())["test"]


def run_all(jobs: list[tuple[Path, list[str], str]], parallel: int):
    """Each unfinished job as `demo.py ... --work FOLDER` (or the module its flags name), `parallel` at a time,
    its log appended to FOLDER.log."""
    waiting = [(work, flags) for work, flags, arm in jobs if not finished(work, arm)]
    running, failed = [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while waiting or running:
        while waiting and len(running) < parallel:
            work, flags = waiting.pop(0)
            program = [] if flags[:1] == ["-m"] else [str(ROOT / "demo.py")]
            cmd = [sys.executable, *program, *flags, "--work", str(work)]
            work.parent.mkdir(parents=True, exist_ok=True)
            print(f"$ {' '.join(cmd)}   # log: {work}.log", flush=True)
            log = open(f"{work}.log", "a")
            process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((work, process, log))
        time.sleep(5)
        for job in [j for j in running if j[1].poll() is not None]:
            running.remove(job)
            job[2].close()
            print(f"{job[0]}: {'finished' if job[1].returncode == 0 else f'failed (exit {job[1].returncode})'}",
                  flush=True)
            if job[1].returncode:
                failed.append(job[0])
    if failed:
        raise SystemExit(f"failed: {', '.join(map(str, failed))}; see their logs, rerun to resume")


# -----------------------------------------------------------------------------
# the summary


def row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


# what a column measures: {name: (results' table, "en" or the non-dominant "avg")}; any other name is (name, "avg")
MEASURES = {"en": ("test", "en"), "sampled": ("test-sampled", "avg"), "sampled en": ("test-sampled", "en")}


def column(key: str) -> tuple[str, str]:
    """(results' table, "en" or "avg") of the column `key` (MEASURES)."""
    return MEASURES.get(key, (key, "avg"))


def measure(result: dict, key: str, model: str) -> float:
    """One run's score of `model` under the column `key` (MEASURES): a split's non-dominant average or its English."""
    table, what = column(key)
    accuracy = result[table][model]
    return accuracy["en"] if what == "en" else non_dominant(accuracy)


def differences_table(results: dict[int, dict], pairs: list[tuple[str, str]], splits=("test", "en", "dev", "ood")
                      ) -> tuple[list[str], dict]:
    """Markdown rows and data of paired differences a − b, seed by seed: interval, exact sign-flip p, wins."""
    lines, data = [], {}
    splits = [s for s in splits if all(column(s)[0] in r for r in results.values())]  # where evaluated
    for a, b in pairs:
        both = {seed: r for seed, r in results.items() if a in r["test"] and b in r["test"]}  # a run can end early
        if len(both) < 2:
            continue
        cells = {}
        for split in splits:
            cells[split] = paired([measure(r, split, a) - measure(r, split, b) for r in both.values()])
        data[f"{a} - {b}"] = {**cells, **({"seeds": list(both)} if len(both) < len(results) else {})}
        label = f"{a} − {b}" + (f" ({len(both)} of {len(results)} seeds)" if len(both) < len(results) else "")
        lines.append(row([label, f"**{show_paired(cells[splits[0]])}**", *(show(cells[s]) for s in splits[1:])]))
    return lines, data


def dial_world(title: str, runs: dict[int, dict], data: dict, key: str, columns: tuple[str, ...]) -> list[str]:
    """A dial's world (the ablation's four arms over its seeds): each arm, LIDR's iteration-1 pairs against gold, and
    the paired differences, in the columns `columns` (MEASURES) that every run has; the numbers go to data[key]."""
    columns = tuple(c for c in columns if all(column(c)[0] in r for r in runs.values()))
    header = [f"{column(c)[1]} ({column(c)[0]})" for c in columns]
    lines = ["", f"### {title}", "", row(["arm", *header]), row(["---"] * (len(columns) + 1))]
    data[key] = {"seeds": list(runs), "arms": {}, "differences": {}}
    for arm in [a for a in ARMS if all(a in r["test"] for r in runs.values())]:
        cells = {c: interval([measure(r, c, arm) for r in runs.values()]) for c in columns}
        data[key]["arms"][arm] = cells
        lines.append(row([arm, *(f"**{show_level(cells[c])}**" if c == "test" else show_level(cells[c])
                                 for c in columns)]))
    pairs = [r["pairs"]["1"] for r in runs.values()]
    cells = data[key]["pairs"] = {
        "all": {k: interval([run[k] for run in pairs]) for k in ("accuracy", "agreement")},
        "english": {k: interval([english_pairs(run)[k] for run in pairs]) for k in ("accuracy", "agreement")}}
    lines += ["", f"LIDR's iteration-1 pairs against gold: accuracy {show_level(cells['all']['accuracy'])}, "
              f"agreement {show_level(cells['all']['agreement'])}; English pairs: accuracy "
              f"{show_level(cells['english']['accuracy'])}, agreement {show_level(cells['english']['agreement'])}."]
    rows, data[key]["differences"] = differences_table(
        runs, [("M1", "M0"), ("DPO-only-1", "NLL-only-1"), ("M1", "NLL-only-1"), ("M1", "DPO-only-1")], columns)
    return lines + ["", row(["difference", *header]), row(["---"] * (len(columns) + 1)), *rows]


def summarize(results: dict[int, dict], imperfect: dict[int, dict], english_error_rate: float,
              slip: dict[int, dict] | None = None, slip_rate: float = 0.0, sampled: dict[int, dict] | None = None,
              sampled_dials: str = "", retuned: dict[int, dict] | None = None) -> tuple[str, dict]:
    seeds = list(results)
    splits = ["test", *(s for s in ("dev", "ood") if all(s in r for r in results.values()))]
    lines = [f"Seeds {', '.join(map(str, seeds))}: mean and 95% t-interval over seeds. avg: the four non-dominant "
             "languages. Test is reported (dev beside it where the runs were evaluated there; ood: people and objects "
             "the corpus never names).", "", "### Each arm", "",
             row(["arm", "en (test)", *(f"avg ({s})" for s in splits)]), row(["---"] * (len(splits) + 2))]
    data = {"seeds": seeds, "arms": {}, "pairs": {}, "differences": {}, "noise": [], "english_imperfect": {}}
    for arm in [a for a in ARMS if any(a in r["test"] for r in results.values())]:
        made = [r for r in results.values() if arm in r["test"]]  # a LIDR or SDRRL run can end before M2
        cells = {"en": interval([r["test"][arm]["en"] for r in made]),
                 **{split: interval([non_dominant(r[split][arm]) for r in made]) for split in splits}}
        data["arms"][arm] = cells
        label = arm + (f" ({len(made)} of {len(results)} seeds)" if len(made) < len(results) else "")
        lines.append(row([label, show_level(cells["en"]), f"**{show_level(cells['test'])}**",
                          *(show_level(cells[s]) for s in splits[1:])]))
    lines += ["", "### LIDR's own pairs against gold", "",
              "accuracy: chosen right and rejected wrong, of all pairs; agreement: of the pairs gold tells apart, the "
              "share whose chosen answer is the right one (the paper's agreement of its pairs with a GPT-4 judge: "
              f"{PAPER_AGREEMENT[0]:.0%}–{PAPER_AGREEMENT[1]:.0%}).", "",
              "English pairs: the dominant ones alone (y_en chosen over y_l→en), which train English.", "",
              "| iteration | pairs | accuracy | agreement | English pairs: accuracy | English pairs: agreement |",
              "| --- | --- | --- | --- | --- | --- |"]
    for t in ("1", "2"):
        runs = [r["pairs"][t] for r in results.values() if t in r["pairs"]]
        if len(runs) < len(results) or any(run.get("agreement") is None for run in runs):
            continue
        cells = {key: interval([float(run[key]) for run in runs]) for key in ("n", "accuracy", "agreement")}
        english = [english_pairs(run) for run in runs if "per_language" in run]
        for key in ("accuracy", "agreement"):
            if len(english) == len(runs) and all(e[key] is not None for e in english):
                cells[f"english_{key}"] = interval([e[key] for e in english])
        data["pairs"][t] = cells
        lines.append(f"| {t} | {cells['n']['mean']:.0f} [{cells['n']['low']:.0f}, {cells['n']['high']:.0f}] | "
                     f"{show_level(cells['accuracy'])} | **{show_level(cells['agreement'])}** | "
                     + " | ".join(show_level(cells[k]) if k in cells else "—"
                                  for k in ("english_accuracy", "english_agreement")) + " |")
    lines += ["", "### Paired differences (seed by seed, then over seeds)", "",
              "Mean [95% t-interval]; p: two-sided exact sign-flip test over the seeds; wins+/losses−/ties=.", "",
              row(["difference", "avg (test)", "en (test)", *(f"avg ({s})" for s in splits[1:])]),
              row(["---"] * (len(splits) + 2))]
    rows, data["differences"] = differences_table(results, DIFFERENCES)
    lines += rows
    lines += ["", "### One iteration's gain against the agreement of its pairs with gold", "",
              "Pairs: LIDR's iteration-1 pairs with a seeded share swapped (0: LIDR's own, M1). Agreement: of the "
              "pairs gold tells apart, the share whose chosen answer is the right one.", "",
              "| swapped | agreement | gain avg (test) | gain en (test) |", "| --- | --- | --- | --- |"]
    levels = {0.0: {s: ("M1", r["pairs"]["1"]) for s, r in results.items()}}
    for seed, r in results.items():
        for share, noisy in r.get("pair_noise", {}).items():
            levels.setdefault(float(share), {})[seed] = (noisy["model"], noisy)
    for share, per_seed in sorted(levels.items()):
        points = [{"seed": s, "agreement": pairs["agreement"], "accuracy": pairs["accuracy"],
                   "gain": non_dominant(results[s]["test"][model]) - non_dominant(results[s]["test"]["M0"]),
                   "gain_en": results[s]["test"][model]["en"] - results[s]["test"]["M0"]["en"]}
                  for s, (model, pairs) in per_seed.items() if pairs["agreement"] is not None]
        data["noise"].append({"swapped": share, "points": points})
        agreement, gain = (interval([p[k] for p in points]) for k in ("agreement", "gain"))
        lines.append(f"| {share:.0%} | {show_level(agreement)} | **{show(gain)}** | "
                     f"{show(interval([p['gain_en'] for p in points]))} |")
    shares = sorted({share for r in results.values() for share in r.get("pair_noise", {})}, key=float)
    split_pairs = [pair for share in shares for pair in (
        (f"pair-noise-{share}-dpo-only", f"pair-noise-{share}-nll-only"),
        (f"pair-noise-{share}-dpo-only", "DPO-only-1"), (f"pair-noise-{share}-nll-only", "NLL-only-1"),
        (f"pair-noise-{share}-1", "M1"), (f"pair-noise-{share}-1", f"pair-noise-{share}-nll-only"))]
    rows, data["noise_split"] = differences_table(results, split_pairs, ("test", "en"))
    if rows:
        lines += ["", "### Label noise split by term", "",
                  "The same swapped pairs: DPO only on them, NLL only on their chosen answers, LIDR (both terms); each "
                  "against the other and against its own arm on the clean pairs.", "",
                  "| difference | avg (test) | en (test) |", "| --- | --- | --- |", *rows]
    if slip:
        title = (f"English slipping ({slip_rate:.0%} of the English (object, operation) cells answer one too many, the "
                 f"operation right; seeds {', '.join(map(str, slip))})")
        lines += dial_world(title, slip, data, "slip", ("test", "en"))
    if sampled:
        title = (f"Sampled answers ({sampled_dials}; seeds {', '.join(map(str, sampled))}). sampled: test, one answer "
                 "per problem at the same temperature")
        lines += dial_world(title, sampled, data, "sampled", ("test", "en", "sampled", "sampled en"))
    if retuned:
        title = (f"Sampled answers, every arm at the setting chosen on this world's dev ({sampled_dials}; seeds "
                 f"{', '.join(map(str, retuned))})")
        lines += dial_world(title, retuned, data, "sampled_retuned", ("test", "en", "sampled", "sampled en"))
    if imperfect:
        lines += ["", f"### English imperfect ({english_error_rate:.0%} of the English (object, operation) cells "
                  "misread in the corpus)", "", "| model | en (test) | avg (test) | avg (dev) |",
                  "| --- | --- | --- | --- |"]
        for model in ("M0", "M1", "M2"):
            cells = {"en": interval([r["test"][model]["en"] for r in imperfect.values()]),
                     "test": interval([non_dominant(r["test"][model]) for r in imperfect.values()]),
                     "dev": interval([non_dominant(r["dev"][model]) for r in imperfect.values()])}
            data["english_imperfect"][model] = cells
            lines.append(f"| {model} | **{show_level(cells['en'])}** | {show_level(cells['test'])} | "
                         f"{show_level(cells['dev'])} |")
        for a, b in (("M1", "M0"), ("M2", "M1")):
            cell = interval([r["test"][a]["en"] - r["test"][b]["en"] for r in imperfect.values()])
            data["english_imperfect"][f"en {a} - {b}"] = cell
            lines.append(f"\nEnglish, {a} − {b}: {show(cell)} (seeds {', '.join(map(str, imperfect))})")
    return "\n".join(lines) + "\n", data


def plot_noise(noise: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.axvspan(*PAPER_AGREEMENT, color="tab:orange", alpha=0.15, label="the paper's pairs and a GPT-4 judge: 57–79%")
    ax.axhline(0, color="gray", lw=0.8)
    xs, ys = [], []
    for level in noise:
        points = level["points"]
        ax.scatter([p["agreement"] for p in points], [p["gain"] for p in points], s=14, color="tab:blue", alpha=0.5)
        xs.append(statistics.mean(p["agreement"] for p in points))
        ys.append(statistics.mean(p["gain"] for p in points))
    ax.plot(xs, ys, color="tab:blue", marker="o", label="mean over seeds")
    ax.set_xlabel("agreement of iteration 1's pairs with gold")
    ax.set_ylabel("M1 − M0, non-dominant average (test)")
    ax.set_title("One LIDR iteration's gain against its pairs' accuracy", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tuned(args, folder: Path):
    """FOLDER/tuned.json: per arm the setting chosen on the tuning seeds' dev split (world.tune.choose, from
    FOLDER/tune/seedN), the grid's mean dev accuracy beside it, and the seeds."""
    from world.tune import choose

    per_seed = {seed: json.loads((folder / "tune" / f"seed{seed}" / "dev.json").read_text())["dev"]
                for seed in args.tune_seeds}
    write_json_atomic(folder / "tuned.json", {"tune_seeds": args.tune_seeds, "chosen": choose(per_seed),
                                              "dev": per_seed})


def tuned_markdown(tuned: dict, world: str = "the main world") -> str:
    lines = [f"### Settings chosen on {world}'s dev (tuning seeds {', '.join(map(str, tuned['tune_seeds']))}, never "
             "tested)", "",
             "| arm | chosen | mean dev avg | the grid (mean dev avg) |", "| --- | --- | --- | --- |"]
    for arm, c in tuned["chosen"].items():
        grid = ", ".join(f"{t} {v:.3f}" for t, v in c["table"].items())
        lines.append(f"| {arm} | {c['setting']} | {c['dev_mean']:.3f} | {grid} |")
    return "\n".join(lines) + "\n"


def read_results(folders: dict[int, Path], required: bool) -> dict[int, dict]:
    results = {}
    for seed, folder in folders.items():
        path = folder / "report" / "results.json"
        if path.is_file():
            results[seed] = json.loads(path.read_text())
        elif required:
            raise SystemExit(f"{path}: missing; run without --summarize-only")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true",
                        help="first choose every arm's settings on dev over --tune-seeds (WORK/tuned.json); the test "
                             "runs then use them")
    parser.add_argument("--tune-seeds", type=int, nargs="+", default=[0, 1], help="default: %(default)s")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(100, 110)),
                        help="test seeds, never used for tuning (default: 100-109)")
    parser.add_argument("--pair-noise", type=float, nargs="*", default=[0.3],
                        help="shares of iteration-1 pairs swapped: LIDR, DPO only and NLL only on them (default: "
                             "%(default)s)")
    parser.add_argument("--slip-rate", type=float, default=0.25,
                        help="a world whose English slips in this share of cells, every arm (0: none; default: "
                             "%(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="a world whose answers are sampled at this temperature, English soft errors at "
                             "--soft-rate and --samples answers per prompt, every arm (0: none; default: %(default)s)")
    parser.add_argument("--soft-rate", type=float, default=0.3,
                        help="the sampled world's share of English answers misread at random (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=2,
                        help="the sampled world's answers per prompt and language (default: %(default)s)")
    parser.add_argument("--tune-sampled", action="store_true",
                        help="also choose the sampled world's own settings on its dev split (M1, DPO only and NLL "
                             "only, over --tune-seeds: WORK/sampled/tuned.json), then run its test seeds at them "
                             "(WORK/sampled/tuned/seedN) beside the runs at the main world's settings")
    parser.add_argument("--all-arms", action="store_true",
                        help="every arm (M2, SDRRL, gold-SFT too) on test and OOD, added to each seed's main run "
                             "(what is finished there is kept); default: M0, M1, DPO only and NLL only on test, the "
                             "primary comparisons")
    parser.add_argument("--english-error-rate", type=float, default=0.0,
                        help="a world whose English misreads this share of cells, LIDR only (0: none; default: 0)")
    parser.add_argument("--jobs", type=int, default=2, help="demo runs at a time (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("runs/world-study"))
    parser.add_argument("--summarize-only", action="store_true", help="read finished runs, run nothing")
    args = parser.parse_args(argv)
    if args.tune and not args.summarize_only:
        run_all(tune_jobs(args), args.jobs)
        write_tuned(args, args.work)
    if args.tune_sampled and not args.summarize_only:
        run_all(tune_jobs(args, sampled=True), args.jobs)
        write_tuned(args, args.work / "sampled")
    if not args.summarize_only:
        run_all(jobs_for(args), args.jobs)
    results = read_results({s: args.work / f"seed{s}" for s in args.seeds}, required=True)
    imperfect = read_results({s: args.work / "english-imperfect" / f"seed{s}" for s in args.seeds}, required=False)
    slip = {} if not args.slip_rate else read_results({s: args.work / "slip" / f"seed{s}" for s in args.seeds},
                                                      required=False)
    sampled, retuned = ({}, {}) if not args.temperature else (
        read_results({s: args.work / "sampled" / f"seed{s}" for s in args.seeds}, required=False),
        read_results({s: args.work / "sampled" / "tuned" / f"seed{s}" for s in args.seeds}, required=False))
    text, data = summarize(results, imperfect, args.english_error_rate, slip, args.slip_rate, sampled,
                           " ".join(sampled_flags(args)), retuned)
    if (args.work / "sampled" / "tuned.json").exists():
        text += "\n" + tuned_markdown(json.loads((args.work / "sampled" / "tuned.json").read_text()), "the sampled world")
    if (args.work / "tuned.json").exists():
        text = tuned_markdown(json.loads((args.work / "tuned.json").read_text())) + "\n" + text
    plot_noise(data["noise"], args.work / "noise.png")
    write_text_atomic(args.work / "summary.md", text + "\n![gain against pair agreement](noise.png)\n")
    write_json_atomic(args.work / "summary.json", data)
    print(text)


if __name__ == "__main__":
    main()
