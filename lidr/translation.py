"""Self-translation (LIDR step 3): M_t translates its own answers with the paper's prompt.

    ids = prompt_ids(tokenizer, "The answer is 12.", "fr")
    completion = sampler.generate(model, tokenizer, [ids], settings.TRANSLATION, (CLOSING_TAG,))[0]
    fields(completion)      # {"translation": "La réponse est 12.", "translation_error": None, ...}

    python translate.py --model M0 --in iter1/generate/en.jsonl --field response --to fr --out en-fr.jsonl

y_en goes into every other language and each y_l into English. The user turn wraps the text in
<sentence> tags and asks for <translated> tags; the assistant turn is pre-filled with
"<translated>\\n", so the reply starts with the translation. The translation is the text up to
</translated>; a reply that never closes the tag, or closes it around nothing, is a failed
translation: kept and counted, never passed on as text. Over a file: lidr/harness/sampled.py
`translate_file`. Departures from the reference: docs/method.md §5.4.
"""

from lidr.languages import language_name
from lidr.tokenizer import chat_messages

PREFILL = "<translated>\n"
CLOSING_TAG = "</translated>"
REFERENCE_FAILURE_MARKER = "Translation Error"  # what the reference repository writes for a failed translation


def translation_prompt(text: str, target_lang: str) -> str:
    """The user turn that asks for `text` in `target_lang` (docs/method.md §1.3)."""
    return (
        f"Please translate the following sentences into {language_name(target_lang)}. "
        "The input sentences are wrapped by <sentence> and </sentence>:\n\n"
        f"<sentence>\n{text}\n</sentence>\n\n"
        "The translated result should be wrapped by <translated> and </translated>."
    )


def prompt_ids(tokenizer, text: str, to: str, system: str | None = None) -> list[int]:
    """The translation request in the model's chat format, the reply pre-filled with <translated>."""
    return tokenizer.encode_chat(chat_messages(translation_prompt(text, to), system), prefill=PREFILL)


def parse_translation(reply: str) -> tuple[str | None, str | None]:
    """(translation, None) or (None, reason) from the reply that follows the "<translated>\\n" prefill."""
    end = reply.find(CLOSING_TAG)
    if end < 0:
        return None, "no </translated> before the reply ended"
    translation = reply[:end].strip()
    if not translation:
        return None, "empty translation"
    return translation, None


def fields(completion, out_field: str = "translation") -> dict:
    """{out_field: the translation or None, <out_field>_error: None or why, <out_field>_reply: the reply}."""
    # the sampler cuts the stop string off the text: put the closing tag back when it was seen
    reply = completion.text + (CLOSING_TAG if completion.finish_reason == "stop_string" else "")
    translation, error = parse_translation(reply)
    return {out_field: translation, out_field + "_error": error, out_field + "_reply": completion.text}
