"""python -m lidr.cli.sdrrl: SDRRL's supervised rows from one iteration folder, for SFT.

    python -m lidr.cli.sdrrl --dir runs/lidr/iter1 --langs es,ru,de,fr [--translation-task-ids IDS.jsonl]
    python iterate.py --method sdrrl ... --sdrrl-reference-field answer     # with the translated QA part
    torchrun --nproc_per_node=8 train_dpo.py --objective sft --data runs/lidr/iter1/sdrrl.jsonl ...

Reads DIR/generate/{lang}.jsonl, DIR/translate/{en}-{l}.jsonl and, with --reference-field F (the
field of the prompt rows holding the prompt set's own English answer), translate/{en}-{l}.reference.jsonl;
writes DIR/sdrrl.jsonl ({id, lang, kind, prompt, response}: kinds english, target, translated,
code_switched) and sdrrl_report.json (every count). Failed translations are skipped and counted;
random choices follow lidr/settings.py's seed rule (key: id, language, part). An existing output
is written over only when this command made it from the same inputs and options. The rows:
lidr/sdrrl.py; the files: lidr/harness/stage_files.py; where this reconstruction departs from the
paper: docs/method.md §5.6.
"""

from pathlib import Path

from lidr.cli import command, parse_iteration_rows
from lidr.sdrrl import SDRRLOptions


@command("rerun the same command (its outputs are written whole or not at all)")
def main(argv=None):
    args, options, task_ids = parse_iteration_rows(argv, __doc__, SDRRLOptions(), "SDRRL rows",
                                                   "target languages, comma-separated",
                                                   "default: DIR/sdrrl.jsonl (report beside it)")
    from lidr.harness.outputs import file_identity  # torch: after the flags, so --help is quick
    from lidr.harness.stage_files import sdrrl_from_dir, write_rows

    try:
        rows, report = sdrrl_from_dir(args.dir, args.langs.split(","), options, task_ids)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if args.translation_task_ids:
        report["made_from"]["inputs"]["translation_task_ids"] = file_identity(args.translation_task_ids)
    out = Path(args.out or Path(args.dir) / "sdrrl.jsonl")
    write_rows(rows, report, out)
    print(f"{len(rows)} SFT rows -> {out}: {report['per_language']}")
    if not rows:
        raise SystemExit(f"{out.with_name(out.stem + '_report.json')}: no rows were made; see the counts")


if __name__ == "__main__":
    main()
