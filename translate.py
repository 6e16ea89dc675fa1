"""Self-translation: the model translates a field of every row into another language (LIDR step 3).

    python translate.py --model M0 --in runs/lidr/iter1/generate/en.jsonl --field response --to fr \\
        --out runs/lidr/iter1/translate/en-fr.jsonl
    torchrun --standalone --nproc_per_node=8 translate.py ...            # data parallel, like generate.py

Each row's text goes into the paper's prompt (lidr/translation.py) as the user turn; the assistant
turn is pre-filled with "<translated>\\n"; decoding is greedy and stops at "</translated>" (or the
end of the turn, or --max-new-tokens). The output row is the input row plus
- `translation`: the text before </translated>, or null when the translation failed;
- `translation_error`: null, or why it failed ("no </translated> before the reply ended", "empty
  translation"): a failed translation is kept, marked and counted, never passed on as text;
- `translation_reply`: the model's reply as generated (after the prefill), to audit failures;
- `translation_meta`: the settings (target language included), finish reason and token count.
Rows whose field is missing or empty (or whitespace), or whose prompt is too long for the model's
context, are reported with their line numbers, skipped and counted; an input with no usable row is
refused. Over-length input, resuming, torchrun, input order and the record of what OUT is made from
(OUT.made-from.json: a rerun with another input, model or settings is refused) work exactly as in
generate.py, whose loop this reuses: a translation cut by the context has no </translated> and is
a failed translation.

How this departs from the paper: the paper's repository writes "Translation Error" in place of a
failed translation; here the field is null and the reason is recorded. Its decoding settings for
translation are greedy with at most 4,096 new tokens; the repetition penalty defaults to its
generation setting, 1.1 (vLLM's meaning): without it, greedy decoding of small models can loop on
the pre-filled <translated> tag until the token limit (seen with SmolLM2-135M).
"""

import argparse
import os
from collections import Counter
from pathlib import Path

import torch

from generate import positive_int, run_rows
from lidr.jsonl import read_complete_lines
from lidr.languages import LANGUAGES
from lidr.sampler import SamplingParams
from lidr.tokenizer import chat_messages
from lidr.translation import CLOSING_TAG, PREFILL, parse_translation, translation_prompt


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF checkpoint folder (the model translates its own answers)")
    parser.add_argument("--in", dest="prompts", required=True, help="input JSONL (e.g. generate.py's output)")
    parser.add_argument("--field", default="response", help="the field to translate (default: %(default)s)")
    parser.add_argument("--to", required=True, choices=sorted(LANGUAGES), help="target language code")
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--out-field", default="translation", help="field for the translation (default: %(default)s)")
    parser.add_argument("--system", default=None, help="system prompt (default: none, or the chat template's own)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=4096,
                        help="default: %(default)s (the paper's); lowered, with a warning, to what the context leaves")
    parser.add_argument("--repetition-penalty", type=float, default=1.1, help="default: %(default)s")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-format", choices=["llama3", "chatml"], default=None, help="default: read from the folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    return parser.parse_args(argv)


def translation_prompt_ids(tokenizer, text: str, to: str, system: str | None = None) -> list[int]:
    """The paper's translation request in the model's chat format, the reply pre-filled with <translated>."""
    return tokenizer.encode_chat(chat_messages(translation_prompt(text, to), system), prefill=PREFILL)


def result_fields(out_field: str):
    def fields(completion) -> dict:
        # the sampler cuts the stop string off the text: put the closing tag back when it was seen
        reply = completion.text + (CLOSING_TAG if completion.finish_reason == "stop_string" else "")
        translation, error = parse_translation(reply)
        return {out_field: translation, out_field + "_error": error, out_field + "_reply": completion.text}

    return fields


def main(argv=None):
    args = parse_args(argv)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, stop_strings=(CLOSING_TAG,))
    settings = {"model": str(Path(args.model).resolve()), "to": args.to, "field": args.field, "system": args.system,
                "max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty}
    run_rows(args, settings, params, lambda tokenizer, row: translation_prompt_ids(tokenizer, row[args.field], args.to,
                                                                                  args.system),
             result_fields(args.out_field), made_by="translate.py")
    out = Path(args.out)
    if int(os.environ.get("RANK", 0)) == 0 and out.exists():
        errors = Counter(row.get(args.out_field + "_error") for row in read_complete_lines(out))
        failed = sum(n for reason, n in errors.items() if reason)
        print(f"{out}: {failed} failed translations" + (f" ({dict(errors)})" if failed else ""))


if __name__ == "__main__":
    main()
