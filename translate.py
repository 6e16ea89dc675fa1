"""Self-translation: the model translates a field of every row into another language (LIDR step 3).

    python translate.py --model M0 --in runs/lidr/iter1/generate/en.jsonl --field response --to fr \\
        --out runs/lidr/iter1/translate/en-fr.jsonl
    torchrun --standalone --nproc_per_node=8 translate.py ...            # data parallel, like generate.py

Each row's text goes into the paper's prompt as the user turn, the assistant turn pre-filled with
"<translated>\\n"; the output row is the input row plus `translation` (null when it failed),
`translation_error`, `translation_reply` and `translation_meta`. The defaults are the paper's
(lidr/settings.py TRANSLATION: greedy, no repetition penalty, at most 4,096 new tokens, the system
turn "You are a helpful assistant."). The stage, and how it departs from the paper, is
`lidr.translation.translate_file`; bad rows, resuming, torchrun and OUT.made-from.json are
lidr/rows.py's, as for generate.py.
"""

import argparse

from lidr import settings
from lidr.cli import add_engine_flags, add_flags, command, engine_from, from_flags
from lidr.languages import LANGUAGES
from lidr.translation import translate_file


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_flags(parser, batch_size=settings.SAMPLING_BATCH_SIZE,
                     model_help="HF checkpoint folder (the model translates its own answers)")
    parser.add_argument("--in", dest="source", required=True, help="input JSONL (e.g. generate.py's output)")
    parser.add_argument("--field", default="response", help="the field to translate (default: %(default)s)")
    parser.add_argument("--to", required=True, choices=sorted(LANGUAGES), help="target language code")
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--out-field", default="translation", help="field for the translation (default: %(default)s)")
    add_flags(parser, settings.TRANSLATION, title="decoding (defaults: the paper's, lidr/settings.py TRANSLATION)")
    return parser.parse_args(argv)


@command()
def main(argv=None):
    args = parse_args(argv)
    translate_file(engine_from(args), args.source, args.out, args.to, from_flags(args, settings.TRANSLATION),
                   args.field, args.out_field)


if __name__ == "__main__":
    main()
