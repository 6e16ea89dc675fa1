"""The controlled world as a study: every arm over seeds with 95% intervals, the gain against pair accuracy, and a
world whose English is imperfect too.

    python bench/world_study.py                          # seeds 0-4, two demo runs at a time (OMP_NUM_THREADS=1)
    python bench/world_study.py --seeds 0 1 2 3 4 5 6 --jobs 1
    python bench/world_study.py --summarize-only         # the tables and the plot again from finished runs

For each seed, two runs of demo.py, each its own process (OMP_NUM_THREADS=1, --jobs at a time):
- WORK/seedN: the default arms (M0, LIDR's M1 and M2, SDRRL-1/-2, DPO-only-1, NLL-only-1, gold-SFT) and one LIDR
  iteration per --pair-noise share (that share of its iteration-1 pairs swapped);
- WORK/english-imperfect/seedN: M0, M1, M2 in a world whose English corpus misreads the verb in
  --english-error-rate of its (object, operation) cells.
A run whose report/results.json exists is skipped; an interrupted one resumes (the demo skips finished stages),
so rerunning the same command continues the study. Then, on test (dev beside it, and OOD):
- each arm: mean and 95% t-interval over seeds of English and of the non-dominant average;
- paired differences, seed by seed: M1 − M0, M2 − M1, LIDR − NLL only, LIDR − DPO only, LIDR − SDRRL (one and two
  iterations), gold-SFT − M2;
- the gain of one iteration over M0 against the agreement of its pairs with gold (WORK/noise.png, the paper's
  57–79% agreement of its pairs with a GPT-4 judge shaded);
- the English-imperfect world's M0 → M1 → M2 in English and the other languages.
Written to WORK/summary.md, WORK/summary.json and WORK/noise.png; bench/RESULTS.md has a run of it. Absolute
numbers differ between machines (M0 itself does: float reductions differ between CPUs); the effects should not.
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


def show(cell: dict) -> str:
    return f"{cell['mean']:+.3f} [{cell['low']:+.3f}, {cell['high']:+.3f}]"


def show_level(cell: dict) -> str:
    return f"{cell['mean']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def non_dominant(accuracy: dict) -> float:
    return sum(accuracy[lang] for lang in OTHERS) / len(OTHERS)


# -----------------------------------------------------------------------------
# running the seeds


def jobs_for(args) -> list[tuple[Path, list[str]]]:
    noise = ["--pair-noise", *map(str, args.pair_noise)] if args.pair_noise else []
    jobs = []
    for seed in args.seeds:
        jobs.append((args.work / f"seed{seed}", ["--seed", str(seed), *noise]))
        jobs.append((args.work / "english-imperfect" / f"seed{seed}",
                     ["--seed", str(seed), "--only-lidr", "--english-error-rate", str(args.english_error_rate)]))
    return jobs


def run_all(jobs: list[tuple[Path, list[str]]], parallel: int):
    """Each unfinished job as `demo.py ... --work FOLDER`, `parallel` at a time, its log in FOLDER.log."""
    waiting = [(work, flags) for work, flags in jobs if not (work / "report" / "results.json").exists()]
    running, failed = [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while waiting or running:
        while waiting and len(running) < parallel:
            work, flags = waiting.pop(0)
            cmd = [sys.executable, str(ROOT / "demo.py"), *flags, "--work", str(work)]
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


def summarize(results: dict[int, dict], imperfect: dict[int, dict], english_error_rate: float) -> tuple[str, dict]:
    seeds = list(results)
    lines = [f"Seeds {', '.join(map(str, seeds))}: mean and 95% t-interval over seeds. avg: the four non-dominant "
             "languages. Test is reported, dev beside it (settings were chosen on dev); ood: people and objects the "
             "corpus never names.", "", "### Each arm", "",
             "| arm | en (test) | avg (test) | avg (dev) | avg (ood) |", "| --- | --- | --- | --- | --- |"]
    data = {"seeds": seeds, "arms": {}, "pairs": {}, "differences": {}, "noise": [], "english_imperfect": {}}
    arms = [a for a in ARMS if all(a in r["test"] for r in results.values())]
    for arm in arms:
        cells = {"en": interval([r["test"][arm]["en"] for r in results.values()]),
                 **{split: interval([non_dominant(r[split][arm]) for r in results.values()])
                    for split in ("test", "dev", "ood")}}
        data["arms"][arm] = cells
        lines.append(f"| {arm} | {show_level(cells['en'])} | **{show_level(cells['test'])}** | "
                     f"{show_level(cells['dev'])} | {show_level(cells['ood'])} |")
    lines += ["", "### LIDR's own pairs against gold", "",
              "accuracy: chosen right and rejected wrong, of all pairs; agreement: of the pairs gold tells apart, the "
              "share whose chosen answer is the right one (the paper's agreement of its pairs with a GPT-4 judge: "
              f"{PAPER_AGREEMENT[0]:.0%}–{PAPER_AGREEMENT[1]:.0%}).", "",
              "| iteration | pairs | accuracy | agreement |", "| --- | --- | --- | --- |"]
    for t in ("1", "2"):
        runs = [r["pairs"][t] for r in results.values() if t in r["pairs"]]
        if len(runs) < len(results) or any(run.get("agreement") is None for run in runs):
            continue
        cells = {key: interval([float(run[key]) for run in runs]) for key in ("n", "accuracy", "agreement")}
        data["pairs"][t] = cells
        lines.append(f"| {t} | {cells['n']['mean']:.0f} [{cells['n']['low']:.0f}, {cells['n']['high']:.0f}] | "
                     f"{show_level(cells['accuracy'])} | **{show_level(cells['agreement'])}** |")
    lines += ["", "### Paired differences (seed by seed, then over seeds)", "",
              "| difference | avg (test) | en (test) | avg (dev) | avg (ood) |", "| --- | --- | --- | --- | --- |"]
    for a, b in DIFFERENCES:
        if a not in arms or b not in arms:
            continue
        cells = {"test": interval([non_dominant(r["test"][a]) - non_dominant(r["test"][b]) for r in results.values()]),
                 "en": interval([r["test"][a]["en"] - r["test"][b]["en"] for r in results.values()]),
                 "dev": interval([non_dominant(r["dev"][a]) - non_dominant(r["dev"][b]) for r in results.values()]),
                 "ood": interval([non_dominant(r["ood"][a]) - non_dominant(r["ood"][b]) for r in results.values()])}
        data["differences"][f"{a} - {b}"] = cells
        lines.append(f"| {a} − {b} | **{show(cells['test'])}** | {show(cells['en'])} | {show(cells['dev'])} | "
                     f"{show(cells['ood'])} |")
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--pair-noise", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.4],
                        help="shares of iteration-1 pairs swapped, one arm each (default: %(default)s)")
    parser.add_argument("--english-error-rate", type=float, default=0.25, help="default: %(default)s")
    parser.add_argument("--jobs", type=int, default=2, help="demo runs at a time (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("runs/world-study"))
    parser.add_argument("--summarize-only", action="store_true", help="read finished runs, run nothing")
    args = parser.parse_args(argv)
    if not args.summarize_only:
        run_all(jobs_for(args), args.jobs)
    results = read_results({s: args.work / f"seed{s}" for s in args.seeds}, required=True)
    imperfect = read_results({s: args.work / "english-imperfect" / f"seed{s}" for s in args.seeds}, required=False)
    text, data = summarize(results, imperfect, args.english_error_rate)
    plot_noise(data["noise"], args.work / "noise.png")
    write_text_atomic(args.work / "summary.md", text + "\n![gain against pair agreement](noise.png)\n")
    write_json_atomic(args.work / "summary.json", data)
    print(text)


if __name__ == "__main__":
    main()
