"""The languages lidr knows: ISO 639-1 code -> the English name that prompts use.

    from lidr.languages import language_name
    language_name("sw")   # "Swahili", as in "Please answer in Swahili."

The table covers every language of the paper's data (AlpaGasus prompts, X-AlpacaEval, MGSM,
translated GSM8K). A code outside it is an error that names the known codes; so is a list of
languages that names one twice (`checked_languages`: --langs fr,fr would double every pair).
"""

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
