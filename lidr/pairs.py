"""LIDR preference pairs: the gap between the dominant language and the others, as DPO data.

    python -m lidr.pairs --dir runs/lidr/iter1 --langs es,ru,de,fr [--dominant-pairs all|one] [--check-language]

For every prompt id and every non-dominant language l (docs/method.md §1.4), from M_t's own
answers y and self-translations:
- non-dominant pair: prompt x_l, chosen y_en→l, rejected y_l
- dominant pair:     prompt x_en, chosen y_en,  rejected y_l→en
When either translation of an id and language failed (y_en→l or y_l→en), both of its pairs are
dropped, as the repository's preprocess_dpo_format_dataset.py does (--failed-translation
drop-both, the default; drop-one keeps the pair whose own translation succeeded). For prompts that
are themselves translation requests (their ids in `translation_task_ids.jsonl`) the chosen answer
of the non-dominant pair is the untranslated y_en: translating a translation would change what was
asked for.

Reads the stage outputs of one iteration folder (the layout `iterate.py` writes):
    generate/{lang}.jsonl   rows {id, instruction, response}
    translate/en-{l}.jsonl  rows {id, translation, translation_error} (y_en → l)
    translate/{l}-en.jsonl  rows {id, translation, translation_error} (y_l → en)
and writes pairs.jsonl ({id, lang, direction, source_lang, prompt, chosen, rejected}; the prompt is
the user turn M_t was asked: generate.py's --prompt-template, recorded in its rows, filled in) and
pairs_report.json (every count, per language and reason, and what the pairs were made from: each
input file's resolved path, size and sha256, the options). Ids are compared as text (3 and "3"
are one id); an empty or whitespace-only answer or translation is no answer; a language named
twice in --langs, or the dominant one among them, is refused. An existing pairs file is written
over only when lidr.pairs wrote it from the same inputs and options (pairs.jsonl.made-from.json):
another command's file (`--out generate/en.jsonl`), a file of unknown origin, or other inputs
are refused, naming the file and what changed.

How this departs from the reference repository (each a named option; the defaults are the reference's
rules unless said otherwise here):
- --failed-translation drop-one (not the default) keeps a pair whose own translation succeeded when
  the other direction's failed: on Llama-3-8B-Instruct's real French data that is 78 more English
  pairs (tests/test_pairs.py).
- Its dominant (English) pairs come from the last language only (a file overwritten in a loop).
  Here every language contributes its dominant pairs (--dominant-pairs all, the default), or one
  language per id is sampled with a seed (--dominant-pairs one, the repository's count without its
  bias towards the last language); the report says which.
- Pairs whose chosen equals rejected are dropped (the repository keeps them; they carry no signal
  and a zero DPO gradient). Optional: language identification of the chosen answer
  (--check-language), a fidelity check for arithmetic answers (--check-numbers: the translated
  side of a pair must carry its source's numbers, and the arithmetic signs written between two of
  them, in order; a small model's translations often do not, and a translation that keeps
  "9 - 8 = 1"'s numbers but writes "9 + 8 = 1" teaches the wrong sum), for answers that end in a checkable number --drop-same-answer (chosen and rejected end
  in the same number: the pair prefers one right answer over another, or one wrong answer over
  another, and DPO would push down the rejected one's correct steps with it; the controlled world
  measures this, bench/RESULTS.md) and length limits in characters.
"""

import argparse
import hashlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from lidr.cli import add_flags, command, from_flags
from lidr.jsonl import (
    check_output, file_identity, hold_lock, read_records, record_output, write_json_atomic, write_text_atomic,
)
from lidr.languages import checked_languages
from lidr.settings import check_settings, seeded, setting, user_turn

DIRECTIONS = ("non_dominant", "dominant")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def numbers(text: str) -> list[str]:
    """The numbers written in a text, in order, digits only ("1,200" and "1.200" are both "1200")."""
    return [re.sub(r"[.,]", "", n) for n in NUMBER.findall(text)]


ARITHMETIC = re.compile(rf"{NUMBER.pattern}|(?<=\d)\s*[-+−×*/÷=]\s*(?=\d)")


def arithmetic(text: str) -> list[str]:
    """The numbers of a text and the signs written between two numbers ("9 - 8 = 1" -> 9 - 8 = 1),
    in order: what a faithful translation of a worked answer must carry unchanged."""
    return [re.sub(r"[.,]", "", t) if t[0].isdigit() else t.strip() for t in ARITHMETIC.findall(text)]


@dataclass(frozen=True)
class PairOptions:
    """The rules that turn answers and translations into pairs (flags of `python -m lidr.pairs` and iterate.py)."""

    dominant: str = setting("en", "the dominant language")
    dominant_pairs: str = setting("all", "all: every language's dominant pairs; one: one language sampled per id",
                                  choices=("all", "one"))
    drop_identical: bool = setting(True, "drop pairs whose chosen equals rejected")
    check_language: bool = setting(False, "drop pairs whose chosen answer is not in the prompt's language (langid)")
    check_numbers: bool = setting(False, "drop pairs whose translated side changes its source's numbers or the signs "
                                         "between them")
    drop_same_answer: bool = setting(False, "drop pairs whose chosen and rejected end in the same number (checkable "
                                            "answers)")
    min_chars: int = setting(1, "drop pairs with a side shorter than this", low=0)
    max_chars: int = setting(0, "drop pairs with a side longer than this; 0 = no limit", low=0)
    failed_translation: str = setting("drop-both", "drop-both: both pairs of an id and language are dropped when "
                                                   "either of its translations failed (the repository's rule); "
                                                   "drop-one: only the pair whose translation failed",
                                      choices=("drop-both", "drop-one"))
    seed: int = setting(0, "the language sampled per id with --dominant-pairs one (lidr.settings.seeded(seed, id))",
                        low=0)

    def __post_init__(self):
        check_settings(self)


def build_pairs(prompts, answers, en_to, to_en, translation_task_ids, langs, options=PairOptions(), off_target=None):
    """(pairs, report) from per-language dicts keyed by prompt id.

    prompts[lang][id], answers[lang][id]: texts (answers missing for ids M_t did not answer);
    en_to[l][id]: y_en translated into l, to_en[l][id]: y_l translated into English; a failed
    translation is None. off_target(text, lang) -> True/False/None (undetermined) is the language
    check of options.check_language (default: lidr.langid.is_off_target).
    """
    en = options.dominant
    langs = checked_languages(langs, dominant=en)
    if options.check_language and off_target is None:
        from lidr.langid import is_off_target as off_target
    skipped = defaultdict(Counter)  # language -> reason -> count
    made = defaultdict(Counter)  # language -> direction -> count
    pairs = []

    def keep(pair, lang, source=None, translation=None):
        chosen, rejected = pair["chosen"], pair["rejected"]
        reason = None
        if options.check_numbers and source is not None and arithmetic(source) != arithmetic(translation):
            reason = "translation_changed_numbers"
        elif options.drop_identical and chosen.strip() == rejected.strip():
            reason = "chosen_equals_rejected"
        elif options.drop_same_answer and numbers(chosen)[-1:] == numbers(rejected)[-1:]:
            reason = "same_final_number"
        elif min(len(chosen), len(rejected)) < options.min_chars:
            reason = "too_short"
        elif options.max_chars and max(len(chosen), len(rejected)) > options.max_chars:
            reason = "too_long"
        elif options.check_language and off_target(chosen, pair["lang"]):
            reason = "chosen_off_target"
        if reason:
            skipped[lang][f"{pair['direction']}:{reason}"] += 1
            return
        made[lang][pair["direction"]] += 1
        pairs.append(pair)

    for id_ in prompts[en]:
        y_en = answers[en].get(id_)
        if y_en is None:
            for lang in langs:
                skipped[lang]["no_dominant_answer"] += 1
            continue
        dominant_langs = list(langs) if options.dominant_pairs == "all" else [seeded(options.seed, id_).choice(langs)]
        for lang in langs:
            y_l = answers[lang].get(id_)
            if id_ not in prompts[lang] or y_l is None:
                skipped[lang]["no_answer_in_language"] += 1
                continue
            if options.failed_translation == "drop-both" and None in (en_to[lang].get(id_), to_en[lang].get(id_)):
                skipped[lang]["both:translation_failed"] += 1  # the repository: either failure drops the id's pairs
                continue
            is_translation_task = id_ in translation_task_ids
            chosen = y_en if is_translation_task else en_to[lang].get(id_)
            if chosen is None:
                skipped[lang]["non_dominant:translation_failed"] += 1
            else:
                made[lang]["translation_task_kept_english"] += is_translation_task
                keep(dict(id=id_, lang=lang, direction="non_dominant", source_lang=lang,
                          prompt=prompts[lang][id_], chosen=chosen, rejected=y_l), lang,
                     *(() if is_translation_task else (y_en, chosen)))
            if lang not in dominant_langs:
                continue
            y_l_en = to_en[lang].get(id_)
            if y_l_en is None:
                skipped[lang]["dominant:translation_failed"] += 1
            else:
                keep(dict(id=id_, lang=en, direction="dominant", source_lang=lang,
                          prompt=prompts[en][id_], chosen=y_en, rejected=y_l_en), lang, y_l, y_l_en)

    report = {
        "dominant": en,
        "dominant_pairs": options.dominant_pairs,
        "dominant_pairs_note": (
            "every language's dominant pairs are kept" if options.dominant_pairs == "all"
            else f"one language per id sampled with seed {options.seed}"
        ),
        "failed_translation": options.failed_translation,
        "departures_from_reference": departures(options, translation_task_ids),
        "prompts": len(prompts[en]),
        "pairs": len(pairs),
        "made_from": {"settings": {"langs": list(langs), "options": vars(options),
                                   "translation_task_ids": id_set_digest(translation_task_ids)}},
        "per_language": {
            lang: {**{d: made[lang][d] for d in DIRECTIONS},
                   "translation_task_kept_english": made[lang]["translation_task_kept_english"],
                   "skipped": dict(sorted(skipped[lang].items()))}
            for lang in langs
        },
    }
    return pairs, report


def departures(options: PairOptions, translation_task_ids) -> list[str]:
    """Where these pair rules depart from the reference repository's (preprocess_dpo_format_dataset.py), in words."""
    said = []
    if options.dominant_pairs == "all":
        said.append("dominant pairs from every language (the repository's come from the last language only)")
    else:
        said.append("dominant pairs from one language sampled per id (the repository's: the last language)")
    if options.failed_translation == "drop-one":
        said.append("a failed translation drops only its own pair (the repository drops both pairs of the id)")
    if not translation_task_ids:
        said.append("no prompt is treated as a translation request (no --translation-task-ids)")
    said += [f"filter {name}" for name in ("drop_identical", "check_language", "check_numbers", "drop_same_answer")
             if getattr(options, name)]
    if options.min_chars > 1 or options.max_chars:
        said.append(f"length limits (min_chars {options.min_chars}, max_chars {options.max_chars})")
    return said


def id_set_digest(ids) -> dict:
    """A set of ids as (count, sha256 of the sorted ids as text): what a report records of it."""
    text = "\n".join(sorted(map(str, ids)))
    return {"count": len(set(map(str, ids))), "sha256": hashlib.sha256(text.encode()).hexdigest()}


# -----------------------------------------------------------------------------
# reading one iteration's stage outputs


def text_or_none(value) -> str | None:
    """A usable text, or None: not a string, empty, or only whitespace."""
    return value if isinstance(value, str) and value.strip() else None


def stage_rows(path: Path) -> list[tuple[int, dict, str]]:
    """[(line, row, id as text)] of a stage output; a bad row, a row without an id or an id written
    twice is an error naming the file and line."""
    rows, bad = read_records(path)
    if bad:
        raise ValueError(f"{path}:{bad[0][0]}: {bad[0][1]}")
    seen, out = {}, []
    for line, row in rows:
        if "id" not in row:
            raise ValueError(f"{path}:{line}: row has no 'id'")
        key = str(row["id"])
        if key in seen:
            raise ValueError(f"{path}:{line}: id {key!r} again (first on line {seen[key]})")
        seen[key] = line
        out.append((line, row, key))
    return out


def read_texts(path: Path, field: str) -> dict:
    """id (as text) -> text from a stage output, None where the field is missing, empty or whitespace."""
    return {key: text_or_none(row.get(field)) for _, row, key in stage_rows(path)}


def read_user_turns(path: Path, lang: str, field: str = "instruction", out_field: str = "response") -> dict:
    """id (as text) -> the user turn M_t was asked, None where the prompt is missing or empty: the prompt in
    the template generate.py recorded in `<out_field>_meta` (lidr.settings.user_turn, `lang` filling its
    {language}; a row without one was asked as it is)."""
    turns = {}
    for line, row, key in stage_rows(path):
        text, meta = text_or_none(row.get(field)), row.get(out_field + "_meta")
        template = meta.get("prompt_template", "plain") if isinstance(meta, dict) else "plain"
        try:
            turns[key] = user_turn(template, text, lang) if text else None
        except ValueError as e:
            raise ValueError(f"{path}:{line}: {e}") from None
    return turns


def read_translations(path: Path) -> dict:
    """id (as text) -> translation, None where it failed (lidr's translation_error, the reference's
    marker, or an empty or whitespace-only text)."""
    from lidr.translation import REFERENCE_FAILURE_MARKER

    out = {}
    for line, row, key in stage_rows(path):
        if "translation" not in row:
            raise ValueError(f"{path}:{line}: row needs 'id' and 'translation'")
        text = text_or_none(row["translation"])
        failed = row.get("translation_error") or text is None or text == REFERENCE_FAILURE_MARKER
        out[key] = None if failed else text
    return out


def read_translation_task_ids(path) -> set:
    """The ids (as text) of the prompts that are translation requests; a row without an id is an error."""
    if path is None:
        return set()
    rows, bad = read_records(path)
    if bad:
        raise ValueError(f"{path}:{bad[0][0]}: {bad[0][1]}")
    missing = next((line for line, row in rows if "id" not in row), None)
    if missing is not None:
        raise ValueError(f"{path}:{missing}: row has no 'id'")
    return {str(row["id"]) for _, row in rows}


def stage_files(folder: Path, langs, en: str) -> dict:
    """name -> path of every stage output the pairs are built from."""
    files = {f"generate/{lang}": folder / "generate" / f"{lang}.jsonl" for lang in (en, *langs)}
    for lang in langs:
        files[f"translate/{en}-{lang}"] = folder / "translate" / f"{en}-{lang}.jsonl"
        files[f"translate/{lang}-{en}"] = folder / "translate" / f"{lang}-{en}.jsonl"
    return files


def build_from_dir(folder, langs, options=PairOptions(), translation_task_ids=frozenset(), field="response",
                   prompt_field="instruction"):
    folder = Path(folder)
    en = options.dominant
    langs = checked_languages(langs, dominant=en)
    files = stage_files(folder, langs, en)
    identities = {name: file_identity(path) for name, path in files.items()}  # before reading: a missing one is named
    prompts = {lang: {k: v for k, v in read_user_turns(files[f"generate/{lang}"], lang, prompt_field, field).items()
                      if v} for lang in (en, *langs)}
    answers = {lang: {k: v for k, v in read_texts(files[f"generate/{lang}"], field).items() if v}
               for lang in (en, *langs)}
    en_to = {lang: read_translations(files[f"translate/{en}-{lang}"]) for lang in langs}
    to_en = {lang: read_translations(files[f"translate/{lang}-{en}"]) for lang in langs}
    pairs, report = build_pairs(prompts, answers, en_to, to_en, {str(i) for i in translation_task_ids}, langs, options)
    report["made_from"]["inputs"] = identities
    return pairs, report


def write_rows_and_report(rows, report, out_jsonl, out_report, made_by: str):
    """Write the rows and their report, over an earlier output only when `made_by` made it from the
    same inputs and options (report["made_from"]); refuse, naming the file, otherwise."""
    with hold_lock(out_jsonl, made_by):  # one process per output
        check_output(out_jsonl, made_by, report["made_from"], companions=[out_report])
        record_output(out_jsonl, made_by, report["made_from"])
        write_text_atomic(out_jsonl, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        write_json_atomic(out_report, report)


def write_pairs(pairs, report, out_jsonl, out_report):
    """The pairs and their report (lidr.pairs' output)."""
    write_rows_and_report(pairs, report, out_jsonl, out_report, "lidr.pairs")


@command("rerun the same command (its outputs are written whole or not at all)")
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="iteration folder holding generate/ and translate/")
    parser.add_argument("--langs", required=True, help="non-dominant languages, comma-separated (e.g. es,ru,de,fr)")
    add_flags(parser, PairOptions(), title="pair rules")
    parser.add_argument("--translation-task-ids", help="JSONL with the ids of prompts that are translation requests")
    parser.add_argument("--out", help="pairs JSONL (default: DIR/pairs.jsonl; the report goes beside it)")
    args = parser.parse_args(argv)
    options = from_flags(args, PairOptions())
    out = Path(args.out or Path(args.dir) / "pairs.jsonl")
    try:
        task_ids = read_translation_task_ids(args.translation_task_ids)
        pairs, report = build_from_dir(args.dir, args.langs.split(","), options, task_ids)
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
