"""python -m lidr.cli.pairs: LIDR's preference pairs from one iteration folder, as DPO data.

    python -m lidr.cli.pairs --dir runs/lidr/iter1 --langs es,ru,de,fr [--dominant-pairs all|one] [--check-language]

Reads DIR/generate/{lang}.jsonl and DIR/translate/{en}-{l}.jsonl, {l}-{en}.jsonl (iterate.py's
layout) and writes DIR/pairs.jsonl ({id, lang, direction, source_lang, prompt, chosen, rejected};
the prompt is the user turn M_t was asked) and pairs_report.json (every count, per language and
reason, and what the pairs were made from). --translation-task-ids names the prompts that are
translation requests (their chosen answer stays y_en). A language named twice, or the dominant one
among --langs, is refused; an existing output is written over only when this command made it from
the same inputs and options. The rules: lidr/pairs.py; the files: lidr/harness/stage_files.py;
where they depart from the reference repository: docs/method.md §5.5.
"""

from pathlib import Path

from lidr.cli import command, parse_iteration_rows, require_extra
from lidr.pairs import PairOptions


@command("rerun the same command (its outputs are written whole or not at all)")
def main(argv=None):
    args, options, task_ids = parse_iteration_rows(
        argv, __doc__, PairOptions(), "pair rules", "non-dominant languages, comma-separated (e.g. es,ru,de,fr)",
        "pairs JSONL (default: DIR/pairs.jsonl; the report goes beside it)")
    if options.check_language:
        require_extra("py3langid", "langid", "--check-language")
    from lidr.harness.outputs import file_identity  # torch: after the flags, so --help is quick
    from lidr.harness.stage_files import pairs_from_dir, write_pairs

    out = Path(args.out or Path(args.dir) / "pairs.jsonl")
    try:
        pairs, report = pairs_from_dir(args.dir, args.langs.split(","), options, task_ids)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if args.translation_task_ids:
        report["made_from"]["inputs"]["translation_task_ids"] = file_identity(args.translation_task_ids)
    write_pairs(pairs, report, out, out.with_name(out.stem + "_report.json"))
    print(f"{len(pairs)} pairs -> {out}")
    for lang, counts in report["per_language"].items():
        print(f"  {lang}: {counts}")
    if not pairs:
        raise SystemExit(f"{out.with_name(out.stem + '_report.json')}: no pairs were made; see the counts")


if __name__ == "__main__":
    main()
