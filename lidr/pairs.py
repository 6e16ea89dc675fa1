"""LIDR preference pairs: the gap between the dominant language and the others, as DPO data.

    python -m lidr.cli.pairs --dir runs/lidr/iter1 --langs es,ru,de,fr [--dominant-pairs all|one]

For every prompt id and every non-dominant language l (docs/method.md §1.4), from M_t's own
answers y and self-translations:
- non-dominant pair: prompt x_l, chosen y_en→l, rejected y_l
- dominant pair:     prompt x_en, chosen y_en,  rejected y_l→en
A failed translation (either direction) drops both pairs of its id and language, the reference's
rule; a prompt that is itself a translation request keeps y_en as its chosen answer. `build_pairs`
is a function of texts in, pairs and a report out; reading an iteration folder and writing
pairs.jsonl is lidr/harness/stage_files.py. Where this departs from the reference: docs/method.md §5.5.
"""

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from lidr.languages import checked_languages
from lidr.settings import check_settings, seeded, setting

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
    """The rules that turn answers and translations into pairs (flags of `python -m lidr.cli.pairs` and iterate.py)."""

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
    check of options.check_language (default: lidr.languages.is_off_target).
    """
    en = options.dominant
    langs = checked_languages(langs, dominant=en)
    if options.check_language and off_target is None:
        from lidr.languages import is_off_target as off_target
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
