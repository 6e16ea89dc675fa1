"""The languages lidr knows (ISO 639-1 code -> the English name prompts use) and which one a text is in.

    from lidr.languages import language_name, detect_language, is_off_target
    language_name("sw")                                  # "Swahili", as in "Please answer in Swahili."
    detect_language("Sie verdient 18 Dollar am Tag.")    # ("de", 0.79)
    is_off_target("18", "de")                            # None: too few letters to tell

The table covers every language of the paper's data; an unknown code, or a list naming one twice,
is an error naming it. Identification is py3langid (its model inside the wheel); digits, formulas
and LaTeX do not vote (docs/method.md §5.9).
"""

import functools
import re
import unicodedata

LANGUAGES = {
    "en": "English",
    "es": "Spanish",
    "ru": "Russian",
    "de": "German",
    "fr": "French",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "zh": "Chinese",
    "th": "Thai",
    "ar": "Arabic",
    "bn": "Bengali",
    "sw": "Swahili",
    "te": "Telugu",
}


def language_name(code: str) -> str:
    if code not in LANGUAGES:
        raise ValueError(f"unknown language code {code!r}; known: {', '.join(sorted(LANGUAGES))}")
    return LANGUAGES[code]


def checked_languages(codes, dominant: str | None = None) -> list[str]:
    """The codes as a list, each known, none twice and none the dominant language (when given:
    lidr.pairs and lidr.sdrrl pair it with each of them); a ValueError names the one that is not."""
    codes = list(codes)
    for code in codes:
        language_name(code)
    twice = sorted({code for code in codes if codes.count(code) > 1})
    if twice:
        raise ValueError(f"the languages {','.join(codes)} name {', '.join(twice)} more than once")
    if dominant in codes:
        raise ValueError(f"the dominant language {dominant!r} is among the languages {','.join(codes)}")
    return codes


# -----------------------------------------------------------------------------
# which language a text is written in (the off-target rate of MGSM and X-AlpacaEval answers)

MIN_LETTERS = 8
LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def letters_only(text: str) -> str:
    """The text with LaTeX commands, digits, punctuation and symbols replaced by spaces."""
    text = LATEX_COMMAND.sub(" ", text)
    kept = [ch if unicodedata.category(ch)[0] in "LM" else " " for ch in text]
    return " ".join("".join(kept).split())


def detect_language(text: str) -> tuple[str | None, float]:
    """(ISO 639-1 code, probability), or (None, 0.0) when fewer than MIN_LETTERS letters remain."""
    cleaned = letters_only(text)
    if sum(unicodedata.category(ch)[0] == "L" for ch in cleaned) < MIN_LETTERS:
        return None, 0.0
    code, prob = _identifier().classify(cleaned)
    return code, float(prob)


def is_off_target(text: str, lang: str) -> bool | None:
    """True when the text is identified as a language other than `lang`; None when undetermined."""
    code, _ = detect_language(text)
    return None if code is None else code != lang
