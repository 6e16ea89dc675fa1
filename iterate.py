"""One command for LIDR: M_t -> M_{t+1}, as many iterations as asked, every stage kept on disk.

    python iterate.py --model Meta-Llama-3-8B-Instruct --work runs/lidr --langs es,ru,de,fr \\
        --prompts ../shared/data/alpagasus/id_0_1000,../shared/data/alpagasus/id_1000_2000 \\
        --translation-task-ids ../shared/data/alpagasus/translation_task_ids.jsonl \\
        --iterations 2 --nproc 8

Iteration t reads PROMPTS' t-th folder ({lang}.jsonl with {id, instruction}), or the last one
given when there are fewer folders than iterations, and runs in WORK/iter{t}/: generate ->
translate -> pairs (or SDRRL rows) -> train (lidr/iterate.py, which says what each stage writes
and how a rerun resumes). With --nproc N > 1 generation and translation run under torchrun (data
parallel), and so does training (FSDP) unless --train-nproc says otherwise; with 1 they run inside
this process. Everything after `--` sets the trainer (lidr/train.py's flags, e.g. -- --lr 1e-6
--epochs 2). Every default is the paper's (lidr/settings.py); the answers, self-translation,
pair and SFT-row flags are those of generate.py, translate.py, lidr.pairs and lidr.sdrrl, with the
prefixes translate-, pairs- and sdrrl-.
"""

import argparse
import sys
from dataclasses import replace

from lidr import settings
from lidr.cli import add_flags, command, from_flags, positive_int
from lidr.iterate import Recipe, run
from lidr.pairs import PairOptions
from lidr.sdrrl import SDRRLOptions
from lidr.train import add_training_flags, options_from


def parse_args(argv=None):
    """(the flags, the trainer's Training from everything after `--`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF folder of M0")
    parser.add_argument("--work", required=True, help="work folder: iter1/, iter2/, ... are kept here")
    parser.add_argument("--prompts", required=True,
                        help="comma-separated folders of {lang}.jsonl prompt files, one per iteration")
    parser.add_argument("--langs", required=True, help="non-dominant languages, comma-separated")
    parser.add_argument("--dominant", default="en", help="the dominant language (default: %(default)s)")
    parser.add_argument("--method", choices=("lidr", "sdrrl"), default="lidr",
                        help="lidr: preference pairs and DPO + NLL (default); sdrrl: self-distilled SFT rows "
                             "(lidr/sdrrl.py) and the SFT objective")
    parser.add_argument("--iterations", type=positive_int, default=1)
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="processes for generation and translation (torchrun when > 1, else in this process)")
    parser.add_argument("--train-nproc", type=positive_int, default=None,
                        help="processes for training (default: --nproc)")
    parser.add_argument("--batch-size", type=positive_int, default=settings.SAMPLING_BATCH_SIZE,
                        help="generation batch per process (default: %(default)s)")
    parser.add_argument("--swap-pairs", action="store_true",
                        help="a control, not the method: every pair's chosen and rejected exchanged before training")
    parser.add_argument("--translation-task-ids", help="JSONL of prompt ids that are translation requests")
    parser.add_argument("--redo-from", choices=("generate", "translate", "pairs", "sdrrl", "train"),
                        help="where WORK's done stages were made from other inputs or settings (refused otherwise): "
                             "delete that stage's outputs and every later one's (only files lidr wrote) and redo them")
    add_flags(parser, settings.ANSWERS, title="answers: M_t answering the prompts (defaults: the paper's, "
                                              "lidr/settings.py ANSWERS)")
    add_flags(parser, settings.TRANSLATION, prefix="translate-",
              title="self-translation (defaults: the paper's, lidr/settings.py TRANSLATION; a small model may loop on "
                    "the pre-filled <translated> tag without --translate-repetition-penalty)")
    add_flags(parser, PairOptions(), prefix="pairs-", skip=("dominant",), title="pair rules, --method lidr "
                                                                                 "(lidr/pairs.py)")
    add_flags(parser, SDRRLOptions(), prefix="sdrrl-", skip=("dominant",), title="SFT rows, --method sdrrl "
                                                                                  "(lidr/sdrrl.py)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    trainer = argparse.ArgumentParser(prog="iterate.py ... --", description="the trainer's flags (lidr/train.py)")
    add_training_flags(trainer)
    return args, options_from(trainer.parse_args(argv[split + 1:]))


@command()
def main(argv=None):
    args, training = parse_args(argv)
    recipe = Recipe(
        langs=tuple(args.langs.split(",")), method=args.method,
        answers=from_flags(args, settings.ANSWERS), translation=from_flags(args, settings.TRANSLATION, "translate-"),
        pairs=replace(from_flags(args, PairOptions(), "pairs-"), dominant=args.dominant),
        sft_rows=replace(from_flags(args, SDRRLOptions(), "sdrrl-"), dominant=args.dominant),
        translation_task_ids=args.translation_task_ids, swap_pairs=args.swap_pairs, training=training)
    return run(args.model, args.prompts.split(","), args.work, recipe, args.iterations, args.batch_size, args.nproc,
               args.train_nproc or args.nproc, args.redo_from)


if __name__ == "__main__":
    main()
