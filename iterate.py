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
--epochs 2). Every default is the paper's (lidr/settings.py).
"""

import argparse
import sys
from dataclasses import replace

from lidr import settings
from lidr.cli import positive_int
from lidr.iterate import Recipe, run
from lidr.pairs import PairOptions
from lidr.train import add_training_flags, options_from


def parse_args(argv=None):
    """(the flags, the trainer's Training from everything after `--`)."""
    answers, translation = settings.ANSWERS, settings.TRANSLATION
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF folder of M0")
    parser.add_argument("--work", required=True, help="work folder: iter1/, iter2/, ... are kept here")
    parser.add_argument("--prompts", required=True,
                        help="comma-separated folders of {lang}.jsonl prompt files, one per iteration")
    parser.add_argument("--langs", required=True, help="non-dominant languages, comma-separated")
    parser.add_argument("--dominant", default="en")
    parser.add_argument("--method", choices=("lidr", "sdrrl"), default="lidr",
                        help="lidr: preference pairs and DPO + NLL (default); sdrrl: self-distilled SFT rows "
                             "(lidr/sdrrl.py) and the SFT objective")
    parser.add_argument("--iterations", type=positive_int, default=1)
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="processes for generation and translation (torchrun when > 1, else in this process)")
    parser.add_argument("--train-nproc", type=positive_int, default=None,
                        help="processes for training (default: --nproc)")
    parser.add_argument("--system", default=answers.system,
                        help="system turn for answers and translations; '' for none "
                             "(default: the paper's, %(default)r)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=answers.max_new_tokens,
                        help="answer length limit (default: the paper's, %(default)s)")
    parser.add_argument("--repetition-penalty", type=float, default=answers.repetition_penalty,
                        help="for answers, vLLM's meaning (default: the paper's, %(default)s)")
    parser.add_argument("--translate-max-new-tokens", type=positive_int, default=translation.max_new_tokens,
                        help="translation length limit (default: the paper's, %(default)s)")
    parser.add_argument("--translate-repetition-penalty", type=float, default=translation.repetition_penalty,
                        help="for translations (default: the paper's, %(default)s: none; a small model may loop on the "
                             "pre-filled <translated> tag without one)")
    parser.add_argument("--batch-size", type=positive_int, default=settings.SAMPLING_BATCH_SIZE,
                        help="generation batch per process (default: %(default)s)")
    parser.add_argument("--dominant-pairs", choices=("all", "one"), default="all")
    parser.add_argument("--check-language", action="store_true", help="drop pairs whose chosen is off-target")
    parser.add_argument("--check-numbers", action="store_true",
                        help="drop pairs whose translated side changes its source's numbers or the signs between them")
    parser.add_argument("--drop-same-answer", action="store_true",
                        help="drop pairs whose chosen and rejected end in the same number (see lidr/pairs.py)")
    parser.add_argument("--swap-pairs", action="store_true",
                        help="a control, not the method: every pair's chosen and rejected exchanged before training")
    parser.add_argument("--translation-task-ids", help="JSONL of prompt ids that are translation requests")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    trainer = argparse.ArgumentParser(prog="iterate.py ... --", description="the trainer's flags (lidr/train.py)")
    add_training_flags(trainer)
    return args, options_from(trainer.parse_args(argv[split + 1:]))


def main(argv=None):
    args, training = parse_args(argv)
    system = args.system or None
    recipe = Recipe(
        langs=tuple(args.langs.split(",")), method=args.method,
        answers=replace(settings.ANSWERS, system=system, max_new_tokens=args.max_new_tokens,
                        repetition_penalty=args.repetition_penalty),
        translation=replace(settings.TRANSLATION, system=system, max_new_tokens=args.translate_max_new_tokens,
                            repetition_penalty=args.translate_repetition_penalty),
        pairs=PairOptions(dominant=args.dominant, dominant_pairs=args.dominant_pairs,
                          check_language=args.check_language, check_numbers=args.check_numbers,
                          drop_same_answer=args.drop_same_answer),
        translation_task_ids=args.translation_task_ids, swap_pairs=args.swap_pairs, training=training)
    return run(args.model, args.prompts.split(","), args.work, recipe, args.iterations, args.batch_size, args.nproc,
               args.train_nproc or args.nproc)


if __name__ == "__main__":
    main()
