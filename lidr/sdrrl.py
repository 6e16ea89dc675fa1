"""SDRRL data: self-distillation from the resource-rich language, as supervised rows.

    python -m lidr.sdrrl --dir runs/lidr/iter1 --langs es,ru,de,fr [--translation-task-ids IDS.jsonl]
    python iterate.py --method sdrrl ... --sdrrl-reference-field answer     # with the translated QA part
    torchrun --nproc_per_node=8 train_dpo.py --objective sft --data runs/lidr/iter1/sdrrl.jsonl ...

SDRRL (arXiv 2402.12204) fine-tunes a model on its own answers in the resource-rich language
carried into the other languages, beside translated question-answer pairs and code-switched
variants. What could be read of the paper here (its abstract, introduction and Figure 1's caption:
besides the translated question-answer pairs in the target language, the model's own answer in
the resource-rich language is collected and translated, as self-distilled data) fixes the parts;
their proportions, its translator, its code-switching rule and its hyperparameters could not be
read, so those are reconstructed, each a flag. The rows, {id, lang, kind, prompt, response}, for
`train_dpo.py --objective sft`, from the stage outputs of one iteration folder (lidr.pairs' layout):
- kind "english": x_en with y_en, the model's own English answer (--no-include-english: left out);
- kind "target": x_l with y_en→l, that answer carried into language l. A prompt that is itself a
  translation request (--translation-task-ids) keeps y_en, as LIDR's pairs do: translating the
  answer of a translation request would change what was asked for;
- kind "translated" (with --reference-field F): x_l with a_en→l, the prompt set's own English
  answer (field F of the prompt rows, e.g. GSM8K's `answer`) translated into l: the paper's
  translated question-answer pairs (translate/en-{l}.reference.jsonl);
- kind "code_switched": for a share of the target rows (--code-switch-rows), a copy of question and
  answer in which some units (--code-switch-unit sentence or line, each with chance
  --code-switch-units) are replaced by the English unit at the same position. Units are paired by
  position, so only texts with as many non-empty units in both languages get a variant; the
  others are counted as unaligned.
Failed translations are skipped and counted; every count goes to sdrrl_report.json. Random choices
follow lidr/settings.py's seed rule (key: id, language, part). The prompts are the user turns the
model was asked (generate.py's template, lidr.pairs.read_user_turns); inputs are read as lidr.pairs
reads them (ids as text; an empty answer or translation is none), and an existing output is written
over only when lidr.sdrrl made it from the same inputs and options (sdrrl.jsonl.made-from.json).

How this departs from the paper (a reconstruction; docs/method.md §2):
- The external translator is replaced by self-translation: the model translates with the LIDR
  prompt (lidr/translation.py), as LIDR does.
- The questions arrive translated (the shared prompt sets are parallel), where the paper
  translates them too.
- Code-switching swaps whole sentences (or lines) by position; the paper's granularity could not be
  read, and word-level switching would need a bilingual dictionary or an aligner that lidr does
  not have.
"""

import argparse
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from lidr.cli import add_flags, command, from_flags
from lidr.jsonl import file_identity
from lidr.languages import checked_languages
from lidr.pairs import (
    id_set_digest, read_texts, read_translation_task_ids, read_translations, read_user_turns, write_rows_and_report,
)
from lidr.settings import check_settings, seeded, setting

# where a text is cut into units: after a sentence's end mark (Latin, CJK, Devanagari), or at line breaks
UNIT_BOUNDARY = {"sentence": re.compile(r"(?<=[.!?。！？।])(\s+)"), "line": re.compile(r"(\n+)")}


@dataclass(frozen=True)
class SDRRLOptions:
    """How the SFT rows are made (flags of `python -m lidr.sdrrl` and iterate.py --method sdrrl)."""

    dominant: str = setting("en", "the dominant language")
    include_english: bool = setting(True, "keep the English (x_en, y_en) rows")
    reference_field: str | None = setting(None, "field of the prompt rows holding the prompt set's own English answer: "
                                                "its self-translations make the 'translated' rows (the paper's "
                                                "translated question-answer pairs); None: no such rows")
    code_switch_rows: float = setting(0.5, "share of target rows that also get a code-switched variant",
                                      low=0.0, high=1.0)
    code_switch_unit: str = setting("sentence", "what a code-switch swaps: a sentence or a line", choices=tuple(
        UNIT_BOUNDARY))
    code_switch_units: float = setting(0.3, "chance that each unit of such a row is replaced by its English unit",
                                       low=0.0, high=1.0)
    seed: int = setting(0, "which rows and units are code-switched (lidr.settings.seeded(seed, id, lang, part))",
                        low=0)

    def __post_init__(self):
        check_settings(self)


def units(text: str, unit: str) -> list[str]:
    """The text cut at its unit boundaries: [unit, separator, unit, ..., unit] (joining them gives the text back)."""
    return UNIT_BOUNDARY[unit].split(text)


def code_switch(text: str, english: str, unit: str, p: float, rng) -> str | None:
    """text with each non-empty unit (sentence or line) swapped for the English unit at its position with chance p;
    the text's own separators are kept.

    None when the two texts have different numbers of non-empty units (no alignment) or when no
    unit was swapped (the variant would equal the original)."""
    ours, theirs = units(text, unit), [u for u in units(english, unit)[::2] if u.strip()]
    positions = [i for i in range(0, len(ours), 2) if ours[i].strip()]
    if len(positions) != len(theirs):
        return None
    swapped = list(ours)
    for i, en in zip(positions, theirs):
        if rng.random() < p:
            swapped[i] = en
    return "".join(swapped) if swapped != ours else None


def build_sdrrl_rows(prompts, answers, en_to, langs, options=SDRRLOptions(), translation_task_ids=frozenset(),
                     references_to=None):
    """(rows, report) from per-language dicts keyed by id (the inputs of lidr.pairs.build_pairs).

    references_to[l][id]: the prompt set's English answer translated into l (None where it failed);
    None when there is no translated part (options.reference_field None)."""
    en = options.dominant
    langs = checked_languages(langs, dominant=en)
    rows, counts = [], defaultdict(Counter)
    for id_, y_en in answers[en].items():
        if options.include_english:
            rows.append(dict(id=id_, lang=en, kind="english", prompt=prompts[en][id_], response=y_en))
            counts[en]["english"] += 1
        for lang in langs:
            x_l = prompts[lang].get(id_)
            if x_l is None:
                counts[lang]["skipped:no_prompt"] += 1
                continue
            if references_to is not None:
                a_l = references_to[lang].get(id_)
                if a_l is None:
                    counts[lang]["translated:skipped:no_reference_or_translation_failed"] += 1
                else:
                    rows.append(dict(id=id_, lang=lang, kind="translated", prompt=x_l, response=a_l))
                    counts[lang]["translated"] += 1
            if id_ in translation_task_ids:  # the answer to a translation request is not translated again
                rows.append(dict(id=id_, lang=lang, kind="target", prompt=x_l, response=y_en))
                counts[lang]["target"] += 1
                counts[lang]["translation_task_kept_english"] += 1
                continue
            y_l = en_to[lang].get(id_)
            if y_l is None:
                counts[lang]["skipped:translation_failed"] += 1
                continue
            rows.append(dict(id=id_, lang=lang, kind="target", prompt=x_l, response=y_l))
            counts[lang]["target"] += 1
            if seeded(options.seed, id_, lang, "row").random() >= options.code_switch_rows:
                continue
            switch = options.code_switch_unit, options.code_switch_units
            prompt = code_switch(x_l, prompts[en][id_], *switch, seeded(options.seed, id_, lang, "prompt")) or x_l
            response = code_switch(y_l, y_en, *switch, seeded(options.seed, id_, lang, "response")) or y_l
            if (prompt, response) == (x_l, y_l):
                counts[lang]["code_switch:unaligned_or_unchanged"] += 1
                continue
            rows.append(dict(id=id_, lang=lang, kind="code_switched", prompt=prompt, response=response))
            counts[lang]["code_switched"] += 1
    settings = {"langs": list(langs), "options": vars(options),
                "translation_task_ids": id_set_digest(translation_task_ids)}
    report = {"rows": len(rows), "options": vars(options), "per_language": {k: dict(v) for k, v in counts.items()},
              "made_from": {"settings": settings}}
    return rows, report


def reference_translation_file(folder: Path, en: str, lang: str) -> Path:
    """Where the model's translation of the prompt set's English answers into `lang` is kept."""
    return folder / "translate" / f"{en}-{lang}.reference.jsonl"


def build_from_dir(folder, langs, options=SDRRLOptions(), translation_task_ids=frozenset(), field="response",
                   prompt_field="instruction"):
    folder = Path(folder)
    en = options.dominant
    langs = checked_languages(langs, dominant=en)
    files = {f"generate/{lang}": folder / "generate" / f"{lang}.jsonl" for lang in (en, *langs)}
    files.update({f"translate/{en}-{lang}": folder / "translate" / f"{en}-{lang}.jsonl" for lang in langs})
    if options.reference_field:
        files.update({f"translate/{en}-{lang}.reference": reference_translation_file(folder, en, lang)
                      for lang in langs})
    identities = {name: file_identity(path) for name, path in files.items()}
    prompts = {lang: {k: v for k, v in read_user_turns(files[f"generate/{lang}"], lang, prompt_field, field).items()
                      if v} for lang in (en, *langs)}
    answers = {en: {k: v for k, v in read_texts(files[f"generate/{en}"], field).items() if v}}
    en_to = {lang: read_translations(files[f"translate/{en}-{lang}"]) for lang in langs}
    references_to = ({lang: read_translations(files[f"translate/{en}-{lang}.reference"]) for lang in langs}
                     if options.reference_field else None)
    rows, report = build_sdrrl_rows(prompts, answers, en_to, langs, options,
                                    {str(i) for i in translation_task_ids}, references_to)
    report["made_from"]["inputs"] = identities
    return rows, report


def write_rows(rows, report, out):
    """The rows and their report (beside `out`), over an earlier output only when lidr.sdrrl made it
    from the same inputs and options; refuse, naming the file, otherwise."""
    write_rows_and_report(rows, report, out, out.with_name(out.stem + "_report.json"), "lidr.sdrrl")


@command("rerun the same command (its outputs are written whole or not at all)")
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="iteration folder holding generate/ and translate/")
    parser.add_argument("--langs", required=True, help="target languages, comma-separated")
    add_flags(parser, SDRRLOptions(), title="SDRRL rows")
    parser.add_argument("--translation-task-ids", help="JSONL with the ids of prompts that are translation requests")
    parser.add_argument("--out", help="default: DIR/sdrrl.jsonl (report beside it)")
    args = parser.parse_args(argv)
    options = from_flags(args, SDRRLOptions())
    try:
        task_ids = read_translation_task_ids(args.translation_task_ids)
        rows, report = build_from_dir(args.dir, args.langs.split(","), options, task_ids)
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
