"""python translate.py / python -m lidr.cli.translate: M_t translates a field of every row of a file.

    python -m lidr.cli.translate --model M0 --in runs/lidr/iter1/generate/en.jsonl --field response --to fr \\
        --out runs/lidr/iter1/translate/en-fr.jsonl
    torchrun --standalone --nproc_per_node=8 -m lidr.cli.translate ...     # data parallel, like lidr.cli.generate
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB \\
        -m lidr.cli.translate ...                                           # on each node; OUT shared

Writes the input row plus `translation` (the text before </translated>, or null when the
translation failed), `translation_error` (null, or why it failed), `translation_reply` (the reply
as generated, to audit failures) and `translation_meta` (the settings, target language included,
finish reason and token count). Bad rows, resuming, torchrun and the record of what OUT is made
from work as for every sampling stage (lidr/harness/sampled.py). The stage: lidr/translation.py.
"""

import argparse

from lidr import settings
from lidr.cli import add_engine_flags, add_flags, command, engine_from, from_flags
from lidr.languages import LANGUAGES


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
    from lidr.harness.sampled import translate_file  # torch: after the flags, so --help is quick

    translate_file(engine_from(args), args.source, args.out, args.to, from_flags(args, settings.TRANSLATION),
                   args.field, args.out_field)


if __name__ == "__main__":
    main()
