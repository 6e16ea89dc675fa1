"""Compare models' evaluation results: one markdown table per benchmark, metric and language, and bar charts.

    python -m eval.report --model M0=runs/eval/M0 --model M1=runs/eval/M1 --model M2=runs/eval/M2 \\
        --out runs/eval/report --paper

Each --model NAME=FOLDER is a results folder written by eval.mgsm, eval.alpacaeval and
eval.agreement. Every summary.json found one or two levels below it (mgsm/, gsm8k/,
x-alpacaeval/outputs/, x-alpacaeval/judge-*/, agreement/judge-*/) becomes a section; the same
section of every model lands in one table: a row per model, a column per language and their
average (given only for a row that has every column). Metrics: MGSM/GSM8K accuracy and off-target
rate, X-AlpacaEval win rate ± standard error (per judge folder) and the outputs' off-target rate,
and the judge's agreement with LIDR's preference pairs ± standard error.

Writes {out}/report.md and one PNG per table ({out}/{section}-{metric}.png: grouped bars, one
colour per model, error bars where there is a standard error). OUT is the command's own folder
(OUT.made-from.json beside it): a rerun rewrites it, a non-empty folder it did not make is refused.
A model name given twice is refused. --paper adds the paper's numbers
for Meta-Llama-3-8B-Instruct (docs/method.md §1.9: MGSM accuracy, X-AlpacaEval win rate, M0-M2) as hatched
reference rows; they were measured with the paper's judge and setup, so they compare only loosely.
"""

import argparse
import math
from pathlib import Path

from eval.common import read_summary
from lidr.cli import command, require_extra
from lidr.harness.outputs import check_folder, hold_lock, record_output, write_text_atomic

MADE_BY = "eval.report"  # the owner of --out: OUT.made-from.json beside it

# metric key in summary.json -> (title, number format, standard-error key)
METRICS = {
    "accuracy": ("accuracy", "{:.3f}", None),
    "off_target": ("off-target rate", "{:.3f}", None),
    "win_rate": ("win rate (%) against the reference", "{:.2f}", "se"),
    "lc_win_rate": ("length-controlled win rate (%) against the reference (alpaca_eval's)", "{:.2f}", "lc_se"),
    "agreement": ("judge prefers chosen (%)", "{:.1f}", "se"),
}

PAPER_MODEL = "Meta-Llama-3-8B-Instruct"
PAPER = {  # docs/method.md §1.9, the paper's headline tables
    ("mgsm", "accuracy"): {
        "M0": dict(en=.700, es=.456, ru=.488, de=.468, fr=.464, ja=.284, sw=.192, th=.324, zh=.464, bn=.328),
        "M1": dict(en=.712, es=.616, ru=.604, de=.564, fr=.596, ja=.428, sw=.320, th=.524, zh=.552, bn=.464),
        "M2": dict(en=.720, es=.640, ru=.620, de=.570, fr=.608, ja=.476, sw=.328, th=.536, zh=.592, bn=.472),
    },
    ("x-alpacaeval", "win_rate"): {
        "M0": dict(en=24.90, es=18.08, ru=7.81, de=8.65, fr=14.18),
        "M1": dict(en=30.11, es=21.82, ru=18.01, de=16.87, fr=17.51),
        "M2": dict(en=34.09, es=21.21, ru=19.25, de=16.02, fr=20.34),
    },
}


def find_summaries(folder: Path) -> dict[str, dict]:
    """{section (path of the summary's folder relative to `folder`): summary}; a summary that does not
    read as eval/ writes them (a hand-edited or cut file: no languages, a metric that is not a number)
    stops with one sentence naming the file and the value."""
    found = {}
    for path in sorted([*folder.glob("*/summary.json"), *folder.glob("*/*/summary.json")]):
        summary = read_summary(path)
        if "languages" not in summary:
            raise SystemExit(f"{path}: no 'languages' object; not a summary written by eval/")
        for lang, entry in summary["languages"].items():
            for key in (*METRICS, *(se for _, _, se in METRICS.values() if se)):
                value = entry.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not math.isfinite(value)):
                    raise SystemExit(f"{path}: languages.{lang}.{key} is {value!r}, not a number; not a summary "
                                     f"as eval/ writes it: fix it, or move it away")
        found[path.parent.relative_to(folder).as_posix()] = summary
    return found


def paper_rows(section: str, summary: dict, metric: str) -> dict[str, dict]:
    benchmark = "x-alpacaeval" if section.startswith("x-alpacaeval/judge-") else summary.get("benchmark")
    table = PAPER.get((benchmark, metric), {})
    return {f"paper {name} ({PAPER_MODEL})": {lang: {"value": v} for lang, v in langs.items()}
            for name, langs in table.items()}


def build_tables(models: dict[str, dict[str, dict]], paper: bool) -> list[dict]:
    """[{section, metric, languages, rows: {row name: {lang: {value, se}}}, paper_rows}] in a stable order."""
    sections = list(dict.fromkeys(section for found in models.values() for section in found))
    tables = []
    for section in sections:
        summaries = {name: found[section] for name, found in models.items() if section in found}
        for metric, (_, _, se_key) in METRICS.items():
            rows = {}
            for name, summary in summaries.items():
                cells = {lang: {"value": s[metric], "se": s.get(se_key) if se_key else None}
                         for lang, s in summary["languages"].items() if s.get(metric) is not None}
                if cells:
                    rows[name] = cells
            if not rows:
                continue
            reference = paper_rows(section, next(iter(summaries.values())), metric) if paper else {}
            languages = list(dict.fromkeys(lang for cells in rows.values() for lang in cells))
            tables.append({"section": section, "metric": metric, "languages": languages,
                           "rows": {**rows, **reference}, "paper_rows": list(reference)})
    return tables


def row_average(cells: dict, languages: list[str]) -> float | None:
    if not all(lang in cells for lang in languages):
        return None
    return sum(cells[lang]["value"] for lang in languages) / len(languages)


def markdown_table(table: dict) -> str:
    _, fmt, _ = METRICS[table["metric"]]
    langs = table["languages"]
    lines = ["| model | " + " | ".join(langs) + " | avg |", "| --- |" + " --- |" * (len(langs) + 1)]
    for name, cells in table["rows"].items():
        shown = []
        for lang in langs:
            cell = cells.get(lang)
            if cell is None:
                shown.append("–")
            else:
                se = f" ± {fmt.format(cell['se'])}" if cell.get("se") is not None else ""
                shown.append(fmt.format(cell["value"]) + se)
        average = row_average(cells, langs)
        shown.append("–" if average is None else fmt.format(average))
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def bar_chart(table: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    title, _, _ = METRICS[table["metric"]]
    langs, rows = table["languages"], table["rows"]
    x = np.arange(len(langs))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(langs) + 2) + 2.5, 4.0))
    for i, (name, cells) in enumerate(rows.items()):
        values = [cells[lang]["value"] if lang in cells else np.nan for lang in langs]
        errors = [cells[lang].get("se") or 0.0 if lang in cells else 0.0 for lang in langs]
        is_paper = name in table["paper_rows"]
        ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=name, yerr=errors if any(errors) else None,
               capsize=2, hatch="//" if is_paper else None, alpha=0.5 if is_paper else 1.0)
    ax.set_xticks(x, langs)
    ax.set_title(table["section"], fontsize=10)
    ax.set_ylabel(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(models: dict[str, Path], out: Path, paper: bool = False) -> Path:
    from eval.common import slug

    found = {name: find_summaries(folder) for name, folder in models.items()}
    for name, summaries in found.items():
        if not summaries:
            print(f"{name}: no summary.json under {models[name]}")
    tables = build_tables(found, paper)
    parts = ["# Evaluation report", "", "Models: " + ", ".join(f"{n} (`{f}`)" for n, f in models.items()), ""]
    for table in tables:
        title, _, _ = METRICS[table["metric"]]
        png = f"{slug(table['section'].replace('/', '-'))}-{table['metric']}.png"
        bar_chart(table, out / png)
        parts += [f"## {table['section']}: {title}", "", markdown_table(table), "", f"![{table['section']}]({png})", ""]
    if not tables:
        parts.append("No results found.")
    report = out / "report.md"
    write_text_atomic(report, "\n".join(parts) + "\n")
    return report


@command("rerun the same command")
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER",
                        help="a model's results folder (repeat: M0=runs/eval/M0 M1=...)")
    parser.add_argument("--out", required=True, help="folder for report.md and the PNG charts")
    parser.add_argument("--paper", action="store_true", help="add the paper's numbers as reference rows")
    args = parser.parse_args(argv)
    require_extra("matplotlib", "plot", "eval.report's charts")
    models = {}
    for spec in args.model:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--model {spec!r}: expected NAME=FOLDER")
        if not Path(folder).is_dir():
            parser.error(f"--model {spec!r}: {folder} is not a folder")
        if name in models:  # one row per name: the second would replace the first without a word
            parser.error(f"--model {spec!r}: the name {name} is given twice (also {name}={models[name]}); give each "
                         f"model its own name")
        models[name] = Path(folder)
    out = Path(args.out)
    with hold_lock(out, MADE_BY):  # --out is this command's folder: a folder of the user's is refused untouched
        check_folder(out, MADE_BY, {})
        record_output(out, MADE_BY, {})
        print(f"wrote {write_report(models, out, args.paper)}")


if __name__ == "__main__":
    main()
