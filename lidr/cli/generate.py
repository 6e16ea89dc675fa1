"""python generate.py / python -m lidr.cli.generate: M_t answers the prompts of a file, or one prompt.

    python -m lidr.cli.generate --model models/smollm2-135m-instruct --prompt "Tom has 26 apples. He buys 28 more. How many apples does he have?"
    python -m lidr.cli.generate --model DIR --prompts ../shared/data/alpagasus/id_0_1000/en.jsonl --out runs/M0/generate_en.jsonl
    python -m lidr.cli.generate --model DIR --prompts ../shared/data/mgsm/fr.jsonl --field query --out-field answer --out mgsm_fr.jsonl
    torchrun --standalone --nproc_per_node=8 -m lidr.cli.generate --model DIR --prompts IN.jsonl --out OUT.jsonl
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB \\
        -m lidr.cli.generate --model DIR --prompts IN.jsonl --out OUT.jsonl    # on each node, OUT shared

IN is JSONL or a JSON list of objects; `--field` names the prompt (AlpaGasus and X-AlpacaEval:
`instruction`, MGSM: `query`). An output row is the input row plus `out_field` (the reply) and
`<out_field>_meta` (the settings that made it, the finish reason, the number of new tokens). Bad
rows, over-length prompts, resuming (rerun the same command), torchrun, input order and
OUT.made-from.json (a rerun with other inputs, model or settings is refused, naming what
changed): lidr/harness/sampled.py. The stage itself: lidr/generation.py.
"""

import argparse

from lidr import settings
from lidr.cli import add_engine_flags, add_flags, command, engine_from, from_flags
from lidr.settings import user_turn


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
    from lidr.harness.sampled import answer, generate_file  # torch: after the flags, so --help is quick

    engine, decoding = engine_from(args), from_flags(args, settings.ANSWERS)
    if args.prompt is not None:
        print(answer(engine, args.prompt, decoding, args.stop, args.lang))
    else:
        generate_file(engine, args.prompts, args.out, decoding, args.field, args.out_field, args.stop, args.lang)


if __name__ == "__main__":
    main()
