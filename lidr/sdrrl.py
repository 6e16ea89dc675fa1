"""SDRRL data: self-distillation from the resource-rich language, as supervised rows.

    python -m lidr.cli.sdrrl --dir runs/lidr/iter1 --langs es,ru,de,fr [--reference-field answer]
    torchrun --nproc_per_node=8 train_dpo.py --objective sft --data runs/lidr/iter1/sdrrl.jsonl ...

SDRRL (arXiv 2402.12204) fine-tunes a model on its own answers in the resource-rich language
carried into the other languages, beside translated question-answer pairs and code-switched
variants. Rows {id, lang, kind, prompt, response}, kind one of: "english" (x_en, y_en), "target"
(x_l, y_en→l; a translation request keeps y_en), "translated" (x_l, the prompt set's own English
answer translated into l) and "code_switched" (a target row with some sentences or lines swapped
for the English ones at the same position). `build_sdrrl_rows` is a function of texts in, rows
and a report out; reading an iteration folder and writing sdrrl.jsonl is
lidr/harness/stage_files.py. Where this reconstruction departs from the paper: docs/method.md §5.6.
"""

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from lidr.languages import checked_languages
from lidr.pairs import id_set_digest
from lidr.settings import check_settings, seeded, setting

# where a text is cut into units: after a sentence's end mark (Latin, CJK, Devanagari), or at line breaks
UNIT_BOUNDARY = {"sentence": re.compile(r"(?<=[.!?。！？।])(\s+)"), "line": re.compile(r"(\n+)")}


@dataclass(frozen=True)
class SDRRLOptions:
    """How the SFT rows are made (flags of `python -m lidr.cli.sdrrl` and iterate.py --method sdrrl)."""

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
