"""Self-translation (LIDR step 3): the paper's prompt, the stage over a file, and reading the translation out.

    from lidr.translation import translate_file
    translate_file(Engine("runs/M0"), "iter1/generate/en.jsonl", "iter1/translate/en-fr.jsonl", "fr")

The command line over it (`python translate.py` in a checkout is the same command):

    python -m lidr.translation --model M0 --in runs/lidr/iter1/generate/en.jsonl --field response --to fr \\
        --out runs/lidr/iter1/translate/en-fr.jsonl
    torchrun --standalone --nproc_per_node=8 -m lidr.translation ...     # data parallel, like lidr.generation
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB \\
        -m lidr.translation ...                                           # on each node; OUT shared (lidr/cluster.py)

The model M_t translates its own answers (LIDR step 3): y_en into every other language, and each
y_l into English. The user turn wraps the text in <sentence> tags, asks for the result inside
<translated> tags, and the assistant turn is pre-filled with "<translated>\\n" so that the reply
starts with the translation itself. The translation is the text up to </translated>; a reply that
never closes the tag (or closes it around nothing) is a failed translation, kept and counted as
such, never passed on as text.

`translate_file` writes the input row plus
- `translation`: the text before </translated>, or null when the translation failed;
- `translation_error`: null, or why it failed ("no </translated> before the reply ended", "empty
  translation");
- `translation_reply`: the model's reply as generated (after the prefill), to audit failures;
- `translation_meta`: the settings (target language included), finish reason and token count.
The rows of the file, bad rows, resuming, torchrun, the record of what OUT is made from and
over-length prompts work as for every sampling stage (lidr/rows.py); a translation cut by the
context has no </translated> and is a failed translation.

How this departs from the reference repository: it writes the marker "Translation Error" in place
of a failed translation; lidr keeps the field empty (None) and records the reason beside it.
`REFERENCE_FAILURE_MARKER` reads that repository's files. Its decoding settings are the defaults
(lidr/settings.py TRANSLATION: greedy, no repetition penalty, at most 4,096 new tokens, the system
turn "You are a helpful assistant."). A small model may loop on the pre-filled <translated> tag
without a penalty (SmolLM2-135M does): its callers raise it visibly (demo.py).
"""

import argparse
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from lidr import settings
from lidr.cli import add_engine_flags, add_flags, command, engine_from, from_flags
from lidr.languages import LANGUAGES, language_name
from lidr.rows import Engine, sample_file
from lidr.settings import PROMPT_TEMPLATES, Decoding, template_text
from lidr.tokenizer import chat_messages

PREFILL = "<translated>\n"
CLOSING_TAG = "</translated>"
REFERENCE_FAILURE_MARKER = "Translation Error"


def translation_prompt(text: str, target_lang: str) -> str:
    """The user turn that asks for `text` in `target_lang` (docs/method.md §1.3)."""
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


# -----------------------------------------------------------------------------
# the stage: a field of every row of a file, translated by the model


def translation_prompt_ids(tokenizer, text: str, to: str, system: str | None = None) -> list[int]:
    """The paper's translation request in the model's chat format, the reply pre-filled with <translated>."""
    return tokenizer.encode_chat(chat_messages(translation_prompt(text, to), system), prefill=PREFILL)


def result_fields(out_field: str):
    """completion -> {out_field: the translation or None, <out_field>_error: None or why, <out_field>_reply}."""

    def fields(completion) -> dict:
        # the sampler cuts the stop string off the text: put the closing tag back when it was seen
        reply = completion.text + (CLOSING_TAG if completion.finish_reason == "stop_string" else "")
        translation, error = parse_translation(reply)
        return {out_field: translation, out_field + "_error": error, out_field + "_reply": completion.text}

    return fields


def translate_file(engine: Engine, source, out, to: str, decoding: Decoding = settings.TRANSLATION,
                   field: str = "response", out_field: str = "translation") -> list[dict]:
    """Translate `field` of every row of `source` into language `to`, into OUT; OUT's rows.

    Decoding stops at </translated> (or the end of the turn, or max_new_tokens). A reply without
    the closing tag (a reply cut by the context too) is a failed translation: null, the reason
    beside it, counted.
    """
    if template_text(decoding.prompt_template) != PROMPT_TEMPLATES["plain"]:
        raise ValueError(f"translation asks in its own prompt; decoding.prompt_template {decoding.prompt_template!r} "
                         f"would be ignored: leave it 'plain'")
    run_settings = {"model": str(Path(engine.model).resolve()), "to": to, "field": field, **asdict(decoding)}
    rows = sample_file(engine, source, out, field, out_field,
                       lambda tokenizer, row: translation_prompt_ids(tokenizer, row[field], to, decoding.system),
                       result_fields(out_field), run_settings, decoding, (CLOSING_TAG,),
                       made_by="translate.py")
    if rows:
        errors = Counter(row.get(out_field + "_error") for row in rows)
        failed = sum(n for reason, n in errors.items() if reason)
        print(f"{out}: {failed} failed translations" + (f" ({dict(errors)})" if failed else ""))
    return rows


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_flags(parser, batch_size=settings.SAMPLING_BATCH_SIZE,
                     model_help="HF checkpoint folder (the model translates its own answers)")
    parser.add_argument("--in", dest="source", required=True, help="input JSONL (e.g. generate.py's output)")
    parser.add_argument("--field", default="response", help="the field to translate (default: %(default)s)")
    parser.add_argument("--to", required=True, choices=sorted(LANGUAGES), help="target language code")
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--out-field", default="translation", help="field for the translation (default: %(default)s)")
    add_flags(parser, settings.TRANSLATION, skip=("prompt_template",),  # translation asks in its own prompt
              title="decoding (defaults: the paper's, lidr/settings.py TRANSLATION)")
    return parser.parse_args(argv)


@command()
def main(argv=None):
    args = parse_args(argv)
    translate_file(engine_from(args), args.source, args.out, args.to, from_flags(args, settings.TRANSLATION),
                   args.field, args.out_field)


if __name__ == "__main__":
    main()
