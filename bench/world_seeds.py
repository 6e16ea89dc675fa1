"""LIDR in the controlled world over several seeds: is the gain larger than the spread between worlds?

    python bench/world_seeds.py --seeds 0 1 2 --controls        # about 3 x 20 minutes on 2 CPU cores
    python bench/world_seeds.py --seeds 0 1 2 --summarize-only  # the table again from finished runs

Runs `demo.py --seed N [--controls] --work WORK/seedN` for each seed (a finished seed is skipped by
the demo itself), then reads every WORK/seedN/report/results.json and prints, per model, the
accuracy per language and the average over the non-dominant languages as mean ± sd over seeds,
and the gains M0 -> M1 -> M2 per seed. Writes the same to WORK/summary.md and WORK/summary.json.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANGS = ["en", "es", "fr", "de", "ru"]
OTHERS = LANGS[1:]


def non_dominant(accuracy: dict) -> float:
    return sum(accuracy[lang] for lang in OTHERS) / len(OTHERS)


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summarize(results: dict[int, dict]) -> tuple[str, dict]:
    models = [m for m in next(iter(results.values())) if all(m in r for r in results.values())]
    lines = [f"Seeds: {', '.join(map(str, results))}. Accuracy on 200 held-out problems per language, "
             "mean ± sd over seeds; avg: the four non-dominant languages.", "",
             "| model | " + " | ".join(LANGS) + " | avg non-en |", "|---" * (len(LANGS) + 2) + "|"]
    table = {}
    for model in models:
        cells = {lang: [r[model][lang] for r in results.values()] for lang in LANGS}
        cells["avg"] = [non_dominant(r[model]) for r in results.values()]
        table[model] = {k: {"mean": statistics.mean(v), "values": v} for k, v in cells.items()}
        lines.append(f"| {model} | " + " | ".join(mean_sd(cells[k]) for k in [*LANGS, "avg"]) + " |")
    lines += ["", "Gains per seed (avg non-en; en):", ""]
    for seed, r in results.items():
        steps = [m for m in ("M0", "M1", "M2") if m in r]
        gains = ", ".join(f"{a}→{b} {non_dominant(r[b]) - non_dominant(r[a]):+.3f}; en {r[b]['en'] - r[a]['en']:+.3f}"
                          for a, b in zip(steps, steps[1:]))
        lines.append(f"- seed {seed}: {gains}")
    return "\n".join(lines) + "\n", table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--controls", action="store_true", help="also the demo's controls")
    parser.add_argument("--work", default="runs/world-seeds")
    parser.add_argument("--summarize-only", action="store_true", help="read finished runs, run nothing")
    args = parser.parse_args()
    work = Path(args.work)
    if not args.summarize_only:
        for seed in args.seeds:
            cmd = [sys.executable, str(ROOT / "demo.py"), "--seed", str(seed), "--work", str(work / f"seed{seed}")]
            print("$ " + " ".join(cmd + (["--controls"] if args.controls else [])), flush=True)
            if subprocess.run(cmd + (["--controls"] if args.controls else []), cwd=ROOT, check=False).returncode:
                raise SystemExit(f"seed {seed} failed; rerun to resume it")
    results = {}
    for seed in args.seeds:
        path = work / f"seed{seed}" / "report" / "results.json"
        if not path.is_file():
            raise SystemExit(f"{path}: missing; run without --summarize-only")
        results[seed] = json.loads(path.read_text())
    text, table = summarize(results)
    (work / "summary.md").write_text(text)
    (work / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
