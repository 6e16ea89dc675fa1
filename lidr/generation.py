"""M_t answers prompts (LIDR step 2): each prompt one user turn (in a template), after the system turn, in the
model's chat format.

    from lidr.generation import generate_file
    generate_file(Engine("runs/M0"), "../shared/data/alpagasus/id_0_1000/fr.jsonl", "runs/lidr/iter1/generate/fr.jsonl")

The command line over it (`python generate.py` in a checkout is the same command):

    python -m lidr.generation --model models/smollm2-135m-instruct --prompt "Tom has 26 apples. He buys 28 more. How many apples does he have?"
    python -m lidr.generation --model DIR --prompts ../shared/data/alpagasus/id_0_1000/en.jsonl --out runs/M0/generate_en.jsonl
    python -m lidr.generation --model DIR --prompts ../shared/data/mgsm/fr.jsonl --field query --out-field answer --out mgsm_fr.jsonl
    torchrun --standalone --nproc_per_node=8 -m lidr.generation --model DIR --prompts IN.jsonl --out OUT.jsonl
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB \\
        -m lidr.generation --model DIR --prompts IN.jsonl --out OUT.jsonl    # on each node, OUT shared

IN is JSONL or a JSON list of objects; `--field` names the prompt (AlpaGasus and X-AlpacaEval:
`instruction`, MGSM: `query`). An output row is the input row plus `out_field` (the reply) and
`<out_field>_meta` (the settings that made it, the finish reason, the number of new tokens). The
rows of the file, bad rows, over-length prompts, resuming (rerun the same command), torchrun,
input order and OUT.made-from.json (a rerun with another input, model or settings is refused,
naming what changed): lidr/rows.py.

How this departs from the paper: its settings are the defaults (lidr/settings.py ANSWERS: greedy,
repetition penalty 1.1, at most 2,400 new tokens, the system turn "You are a helpful assistant.",
the prompt as it is), with lidr's sampler (lidr/sampler.py) in place of vLLM. The repository's
reasoning runs (GSM8K prompts) wrap each prompt in its "Below is an instruction..." template:
prompt_template "alpaca" with the prompts' language (README, "the MGSM recipe").
"""

import argparse
from dataclasses import asdict
from pathlib import Path

from lidr import settings
from lidr.cli import add_engine_flags, add_flags, command, engine_from, from_flags
from lidr.rows import (
    Engine, cut_at_context, decoding_within_context, open_model, sample_file, too_long_reason,
)
from lidr.sampler import generate
from lidr.settings import Decoding, template_text, user_turn
from lidr.tokenizer import chat_messages


def generate_file(engine: Engine, prompts, out, decoding: Decoding = settings.ANSWERS, field: str = "instruction",
                  out_field: str = "response", stop_strings=(), lang: str | None = None) -> list[dict]:
    """Answer the prompt in `field` of every row of `prompts` (JSONL or a JSON list) into OUT; OUT's rows.

    The user turn is `field` in decoding.prompt_template (lidr.settings.user_turn; `lang` fills a
    {language} in it); `<out_field>_meta` records the template's text and `lang`, so a later stage
    (lidr.pairs) rebuilds exactly the user turn that was asked. stop_strings: a reply ends where one
    appears, cut before it.
    """
    user_turn(decoding.prompt_template, "", lang)  # a template that needs a language refuses before any work
    run_settings = {"model": str(Path(engine.model).resolve()), **asdict(decoding),
                    "prompt_template": template_text(decoding.prompt_template), "lang": lang,
                    "stop": list(stop_strings)}
    return sample_file(engine, prompts, out, field, out_field,
                       lambda tokenizer, row: tokenizer.encode_chat(chat_messages(
                           user_turn(decoding.prompt_template, row[field], lang), decoding.system)),
                       lambda completion: {out_field: completion.text}, run_settings,
                       decoding, stop_strings, made_by="generate.py")


def answer(engine: Engine, text: str, decoding: Decoding = settings.ANSWERS, stop_strings=(),
           lang: str | None = None) -> str:
    """The model's reply to one prompt (in decoding.prompt_template, `lang` filling its {language})."""
    model, tokenizer = open_model(engine.model, engine.device, engine.dtype, engine.chat_format)
    user = user_turn(decoding.prompt_template, text, lang)
    prompt, context = tokenizer.encode_chat(chat_messages(user, decoding.system)), model.cfg.max_seq_len
    reason = too_long_reason(len(prompt), context)
    if reason:
        raise SystemExit(f"--prompt: {reason}")
    decoding = decoding_within_context(decoding, [len(prompt)], context)
    completion = generate(model, tokenizer, [prompt], decoding, stop_strings, compile=engine.compile)[0]
    return cut_at_context(completion, len(prompt), context, tokenizer).text


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_flags(parser, batch_size=settings.SAMPLING_BATCH_SIZE)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="input file: JSONL or a JSON list of objects")
    source.add_argument("--prompt", help="answer this one prompt and print the reply")
    parser.add_argument("--out", help="output JSONL (required with --prompts)")
    parser.add_argument("--field", default="instruction", help="the input field holding the prompt (default: %(default)s)")
    parser.add_argument("--out-field", default="response", help="the output field for the reply (default: %(default)s)")
    parser.add_argument("--lang", help="the prompts' language, for a --prompt-template that names {language} (e.g. fr)")
    add_flags(parser, settings.ANSWERS, title="decoding (defaults: the paper's, lidr/settings.py ANSWERS)")
    parser.add_argument("--stop", action="append", default=[], metavar="STRING",
                        help="end a reply where this string appears, cut before it (repeatable)")
    args = parser.parse_args(argv)
    if args.prompts and not args.out:
        parser.error("--prompts needs --out")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty")
    if "" in args.stop:
        parser.error("--stop needs a non-empty string")
    try:
        user_turn(args.prompt_template, "", args.lang)
    except ValueError as e:
        parser.error(f"--prompt-template/--lang: {e}")
    return args


@command()
def main(argv=None):
    args = parse_args(argv)
    engine, decoding = engine_from(args), from_flags(args, settings.ANSWERS)
    if args.prompt is not None:
        print(answer(engine, args.prompt, decoding, args.stop, args.lang))
    else:
        generate_file(engine, args.prompts, args.out, decoding, args.field, args.out_field, args.stop, args.lang)


if __name__ == "__main__":
    main()
