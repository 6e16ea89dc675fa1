"""SDRRL data: self-distillation from the resource-rich language, as supervised rows.

    python -m lidr.sdrrl --dir runs/lidr/iter1 --langs es,ru,de,fr [--no-include-english] [--code-switch-rows 0.5]
    torchrun --nproc_per_node=8 train_dpo.py --objective sft --data runs/lidr/iter1/sdrrl.jsonl ...

THIS IS A RECONSTRUCTION of SDRRL (arXiv 2402.12204): its data sizes, translator, code-switching
rule and hyperparameters could not be read here. It reuses LIDR's stage outputs (the model's own
English answers and their self-translations, same folder layout as lidr.pairs) and writes
{id, lang, kind, prompt, response} rows for `train_dpo.py --objective sft`:
- kind "english": x_en with y_en (keeps English; --no-include-english leaves them out);
- kind "target": x_l with y_en→l, the English answer carried into language l;
- kind "code_switched": for a share of the target rows (--code-switch-rows), a variant whose
  question and answer have some lines (--code-switch-lines, per line) swapped for the English
  line at the same position. Lines are paired by position, so only texts with the same number
  of non-empty lines in both languages get a variant; the others are counted as unaligned.
Failed translations are skipped and counted; every count goes to sdrrl_report.json. Inputs are read
as lidr.pairs reads them (ids as text; an empty or whitespace-only answer or translation is none;
a language named twice is refused), and an existing output is written over only when lidr.sdrrl
made it from the same inputs and options (sdrrl.jsonl.made-from.json); otherwise the command
refuses, naming the file and what changed.
"""

import argparse
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from lidr.cli import add_flags, command, from_flags
from lidr.jsonl import check_output, file_identity, hold_lock, record_output, write_json_atomic, write_text_atomic
from lidr.languages import checked_languages
from lidr.settings import check_settings, setting
from lidr.pairs import read_texts, read_translations


@dataclass(frozen=True)
class SDRRLOptions:
    """How the SFT rows are made (flags of `python -m lidr.sdrrl` and iterate.py --method sdrrl)."""

    dominant: str = setting("en", "the dominant language")
    include_english: bool = setting(True, "keep the English (x_en, y_en) rows")
    code_switch_rows: float = setting(0.5, "share of target rows that also get a code-switched variant",
                                      low=0.0, high=1.0)
    code_switch_lines: float = setting(0.3, "chance that each line of such a row is replaced by its English line",
                                       low=0.0, high=1.0)
    seed: int = setting(0, "which rows and lines are code-switched", low=0)

    def __post_init__(self):
        check_settings(self)


def code_switch(text: str, english: str, p: float, rng: random.Random) -> str | None:
    """text with each non-empty line swapped for the English line at its position with chance p.

    None when the two texts have different numbers of non-empty lines (no alignment) or when no
    line was swapped (the variant would equal the original)."""
    ours = [line for line in text.split("\n") if line.strip()]
    theirs = [line for line in english.split("\n") if line.strip()]
    if len(ours) != len(theirs):
        return None
    swapped = [en if rng.random() < p else line for line, en in zip(ours, theirs)]
    return "\n".join(swapped) if swapped != ours else None


def build_sdrrl_rows(prompts, answers, en_to, langs, options=SDRRLOptions()):
    """(rows, report) from per-language dicts keyed by id (the inputs of lidr.pairs.build_pairs)."""
    en = options.dominant
    langs = checked_languages(langs, dominant=en)
    rng = random.Random(options.seed)
    rows, counts = [], defaultdict(Counter)
    for id_, y_en in answers[en].items():
        if options.include_english:
            rows.append(dict(id=id_, lang=en, kind="english", prompt=prompts[en][id_], response=y_en))
            counts[en]["english"] += 1
        for lang in langs:
            x_l, y_l = prompts[lang].get(id_), en_to[lang].get(id_)
            if x_l is None or y_l is None:
                counts[lang]["skipped:translation_failed" if x_l else "skipped:no_prompt"] += 1
                continue
            rows.append(dict(id=id_, lang=lang, kind="target", prompt=x_l, response=y_l))
            counts[lang]["target"] += 1
            if rng.random() >= options.code_switch_rows:
                continue
            prompt = code_switch(x_l, prompts[en][id_], options.code_switch_lines, rng) or x_l
            response = code_switch(y_l, y_en, options.code_switch_lines, rng) or y_l
            if (prompt, response) == (x_l, y_l):
                counts[lang]["code_switch:unaligned_or_unchanged"] += 1
                continue
            rows.append(dict(id=id_, lang=lang, kind="code_switched", prompt=prompt, response=response))
            counts[lang]["code_switched"] += 1
    report = {"rows": len(rows), "options": vars(options), "per_language": {k: dict(v) for k, v in counts.items()},
              "made_from": {"settings": {"langs": list(langs), "options": vars(options)}}}
    return rows, report


def build_from_dir(folder, langs, options=SDRRLOptions(), field="response", prompt_field="instruction"):
    folder = Path(folder)
    en = options.dominant
    langs = checked_languages(langs, dominant=en)
    files = {f"generate/{lang}": folder / "generate" / f"{lang}.jsonl" for lang in (en, *langs)}
    files.update({f"translate/{en}-{lang}": folder / "translate" / f"{en}-{lang}.jsonl" for lang in langs})
    identities = {name: file_identity(path) for name, path in files.items()}
    prompts = {lang: {k: v for k, v in read_texts(files[f"generate/{lang}"], prompt_field).items() if v}
               for lang in (en, *langs)}
    answers = {en: {k: v for k, v in read_texts(files[f"generate/{en}"], field).items() if v}}
    en_to = {lang: read_translations(files[f"translate/{en}-{lang}"]) for lang in langs}
    rows, report = build_sdrrl_rows(prompts, answers, en_to, langs, options)
    report["made_from"]["inputs"] = identities
    return rows, report


def write_rows(rows, report, out):
    """The rows and their report (beside `out`), over an earlier output only when lidr.sdrrl made it
    from the same inputs and options; refuse, naming the file, otherwise."""
    out_report = out.with_name(out.stem + "_report.json")
    with hold_lock(out, "lidr.sdrrl"):  # one process per output
        check_output(out, "lidr.sdrrl", report["made_from"], companions=[out_report])
        record_output(out, "lidr.sdrrl", report["made_from"])
        write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        write_json_atomic(out_report, report)


@command("rerun the same command (its outputs are written whole or not at all)")
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="iteration folder holding generate/ and translate/")
    parser.add_argument("--langs", required=True, help="target languages, comma-separated")
    add_flags(parser, SDRRLOptions(), title="SDRRL rows")
    parser.add_argument("--out", help="default: DIR/sdrrl.jsonl (report beside it)")
    args = parser.parse_args(argv)
    options = from_flags(args, SDRRLOptions())
    try:
        rows, report = build_from_dir(args.dir, args.langs.split(","), options)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    out = Path(args.out or Path(args.dir) / "sdrrl.jsonl")
    write_rows(rows, report, out)
    print(f"{len(rows)} SFT rows -> {out}: {report['per_language']}")
    if not rows:
        raise SystemExit(f"{out.with_name(out.stem + '_report.json')}: no rows were made; see the counts")


if __name__ == "__main__":
    main()
