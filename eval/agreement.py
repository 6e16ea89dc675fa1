"""Reward-signal agreement: how often a judge prefers LIDR's chosen answer to its rejected one.

    python -m eval.agreement --pairs runs/lidr/iter1/pairs.jsonl --out runs/eval/M0 --sample 200 \\
        --judge http --judge-model gpt-4-1106-preview
    python -m eval.agreement --pairs ... --out ... --both-orders \\
        --judge local --judge-model models/Llama-3.1-70B-Instruct

LIDR's preferences come from the language imbalance, not from a reward model, so some are wrong
on purpose: the paper's GPT-4 judge preferred the chosen answer in 57-79% of pairs, depending on
the language. This command judges a random sample of pairs per language (seeded) and reports,
per language, the agreement = 100 × mean P(chosen beats rejected) ± its standard error, and the
share of pairs where that probability is above one half (hard agreement, a tie counts half).

Input: a JSONL of pairs {prompt, chosen, rejected, lang, ...} (what lidr/pairs.py writes); the
prompt is the instruction text. Rows lacking one of these fields are dropped and counted.
Files: {out}/agreement/judge-{judge}[-both]/{lang}.jsonl (one row per judged pair, keyed by its line
number in the pairs file; a rerun resumes) and summary.json beside them (eval/report.py reads it).
Each {lang}.jsonl records what it was made from ({lang}.jsonl.made-from.json: the pairs file's path,
size and sha256, the judge, the sample settings); a rerun with another pairs file, judge or sample
is refused before anything is written. summary.json is owned the same way and merged by language
(--langs es, then --langs ru, gives one summary of both; eval/common.py).

How this departs from the paper: the paper does not say how many pairs it judged nor with which
prompt; here --sample pairs per language (default 100) and the X-AlpacaEval judge prompt (eval/judge.py).
"""

import argparse
import random
from collections import defaultdict
from pathlib import Path

from eval.common import claim_summary, write_summary
from lidr.cli import command
from lidr.harness.outputs import ResumableWriter, bind_outputs, file_identity, read_records

FIELDS = ("prompt", "chosen", "rejected", "lang")
MADE_BY = "eval.agreement"


def read_pairs(path: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """{lang: [pair {key, instruction, first: chosen, second: rejected}]} and the dropped rows' reasons."""
    try:
        rows, bad = read_records(path)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    by_lang, dropped = defaultdict(list), [(n, f"{path}:{n}: {reason}") for n, reason in bad]
    for n, row in rows:
        missing = [f for f in FIELDS if not isinstance(row.get(f), str) or not row[f].strip()]
        if missing:
            dropped.append((n, f"{path}:{n}: missing or empty field(s) {', '.join(missing)}"))
            continue
        by_lang[row["lang"]].append({"key": str(n), "instruction": row["prompt"], "first": row["chosen"],
                                     "second": row["rejected"]})
    return dict(by_lang), [reason for _, reason in sorted(dropped)]


def sample_pairs(pairs: list[dict], sample: int | None, seed: int) -> list[dict]:
    if sample is None or sample >= len(pairs):
        return pairs
    chosen = random.Random(seed).sample(range(len(pairs)), sample)
    return [pairs[i] for i in sorted(chosen)]


def run(judge, pairs_path: Path, out: Path, sample: int | None, seed: int, both_orders: bool, judge_name: str,
        langs: list[str] | None = None) -> dict:
    from eval.judge import judge_resumable, summarize_preferences

    by_lang, dropped = read_pairs(pairs_path)
    if not by_lang:
        raise SystemExit(f"{pairs_path}: holds no usable pair" + (f"; first dropped: {dropped[0]}" if dropped else ""))
    if dropped:
        print(f"dropped {len(dropped)} pair row(s); first: {dropped[0]}")
    summary = {"benchmark": "agreement", "judge": judge_name, "both_orders": both_orders, "pairs": str(pairs_path),
               "sample": sample, "seed": seed, "dropped_rows": len(dropped), "languages": {}}
    langs = langs or sorted(by_lang)
    identity = {"inputs": {"pairs": file_identity(pairs_path)},
                "judge": {"name": judge_name, "identity": getattr(judge, "identity", None)},
                "settings": {"sample": sample, "seed": seed, "both_orders": both_orders}}
    claim_summary(out / "summary.json", MADE_BY, identity)  # before any output is touched
    bind_outputs(MADE_BY, [(out / f"{lang}.jsonl", identity, ()) for lang in langs])
    for lang in langs:
        available = by_lang.get(lang, [])
        pairs = sample_pairs(available, sample, seed)
        with ResumableWriter(out / f"{lang}.jsonl", key="key") as writer:
            judge_resumable(judge, pairs, writer, both_orders, desc=f"agreement {lang}")
            wanted = {p["key"] for p in pairs}
            rows = [r for r in writer.rows if r["key"] in wanted]
        s = summarize_preferences(rows)
        summary["languages"][lang] = {"n": s["n"], "agreement": s["win_rate"], "se": s["se"],
                                      "hard_agreement": s["hard_win_rate"], "no_verdict": s["no_verdict"],
                                      "pairs_available": len(available)}
        if s["win_rate"] is not None:
            print(f"{lang}: judge prefers chosen {s['win_rate']:.1f}% (hard {s['hard_win_rate']:.1f}%, n={s['n']})")
    return write_summary(out / "summary.json", MADE_BY, identity, summary)


@command("rerun the same command")
def main(argv=None):
    from eval.judge import add_judge_args, judge_folder_name, make_judge

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", required=True, help="JSONL of preference pairs {prompt, chosen, rejected, lang}")
    parser.add_argument("--out", required=True, help="results folder; writes {out}/agreement/judge-*/")
    parser.add_argument("--sample", type=int, default=100,
                        help="pairs judged per language (default: %(default)s; 0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default: %(default)s)")
    parser.add_argument("--langs", nargs="+", default=None, help="languages to judge (default: every one in the file)")
    add_judge_args(parser)
    args = parser.parse_args(argv)
    if args.langs:
        from eval.common import check_langs

        check_langs(parser, args.langs)

    if not Path(args.pairs).is_file():
        parser.error(f"{args.pairs}: no such file")
    judge = make_judge(args)
    try:
        run(judge, Path(args.pairs), Path(args.out) / "agreement" / judge_folder_name(args), args.sample or None,
            args.seed, args.both_orders, judge.name, args.langs)
    finally:
        judge.close()


if __name__ == "__main__":
    main()
