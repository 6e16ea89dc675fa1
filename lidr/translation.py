"""Self-translation: the paper's prompt, and reading the translation out of the model's reply.

The model M_t translates its own answers (LIDR step 3): y_en into every other language, and each
y_l into English. The user turn wraps the text in <sentence> tags, asks for the result inside
<translated> tags, and the assistant turn is pre-filled with "<translated>\\n" so that the reply
starts with the translation itself. The translation is the text up to </translated>; a reply that
never closes the tag (or closes it around nothing) is a failed translation, kept and counted as
such, never passed on as text.

How this departs from the reference repository: it writes the marker "Translation Error" in place
of a failed translation; lidr keeps the field empty (None) and records the reason beside it.
`REFERENCE_FAILURE_MARKER` reads that repository's files.
"""

from lidr.languages import language_name

PREFILL = "<translated>\n"
CLOSING_TAG = "</translated>"
REFERENCE_FAILURE_MARKER = "Translation Error"


def translation_prompt(text: str, target_lang: str) -> str:
    """The user turn that asks for `text` in `target_lang` (METHOD.md §1 step 3)."""
    return (
        f"Please translate the following sentences into {language_name(target_lang)}. "
        "The input sentences are wrapped by <sentence> and </sentence>:\n\n"
        f"<sentence>\n{text}\n</sentence>\n\n"
        "The translated result should be wrapped by <translated> and </translated>."
    )


def parse_translation(reply: str) -> tuple[str | None, str | None]:
    """(translation, None) or (None, reason) from the reply that follows the "<translated>\\n" prefill."""
    end = reply.find(CLOSING_TAG)
    if end < 0:
        return None, "no </translated> before the reply ended"
    translation = reply[:end].strip()
    if not translation:
        return None, "empty translation"
    return translation, None
