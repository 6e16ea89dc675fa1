"""python iterate.py / python -m lidr.cli.iterate: one command for LIDR: M_t -> M_{t+1}, as many iterations as asked, every stage kept on disk.

    python iterate.py --model Meta-Llama-3-8B-Instruct --work runs/lidr --langs es,ru,de,fr \\
        --prompts ../shared/data/alpagasus/id_0_1000,../shared/data/alpagasus/id_1000_2000 \\
        --translation-task-ids ../shared/data/alpagasus/translation_task_ids.jsonl \\
        --iterations 2 --nproc 8
    python iterate.py ... --nproc 8 --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --rdzv-id lidr-8b

Iteration t reads PROMPTS' t-th folder ({lang}.jsonl with {id, instruction}), or the last one
given when there are fewer folders than iterations, and runs in WORK/iter{t}/: generate ->
translate -> pairs (or SDRRL rows) -> train (lidr/iterate.py says what each stage writes;
lidr/harness/stages.py how a rerun resumes). With --nproc N > 1 generation and translation run under torchrun (data
parallel), and so does training (FSDP) unless --train-nproc says otherwise; with 1 they run inside
this process. Everything after `--` sets the trainer (train_dpo.py's flags, e.g. -- --lr 1e-6
--epochs 2). Every default is the paper's or its repository's (lidr/settings.py, lidr/pairs.py;
docs/method.md §4 lists where lidr departs, each a flag); the answers, self-translation, pair and
SFT-row flags are those of generate.py, translate.py, lidr.pairs and lidr.sdrrl, with the prefixes
translate-, pairs- and sdrrl-. The command refuses to start without --translation-task-ids FILE
or --no-translation-tasks, so that the translation-request rule is never lost by a forgotten flag.

The paper's reasoning run (its MGSM gains): the GSM8K training prompts, each asked in the
repository's "Below is an instruction..." template (--prompt-template alpaca); README, "The MGSM
recipe".

The second command runs on each of 2 nodes, R = 0 on one and 1 on the other, WORK on a filesystem
both see: node 0 runs pairs and writes the done markers, and every torchrun stage meets at HOST's
c10d rendezvous (lidr/harness/stages.py `Nodes`).
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from lidr import settings
from lidr.cli import add_flags, command, from_flags, positive_int, require_extra
from lidr.cli.train import add_training_flags, options_from
from lidr.pairs import PairOptions
from lidr.sdrrl import SDRRLOptions


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
                        help="processes per node for generation and translation (torchrun when > 1 or on "
                             "several nodes, else in this process)")
    parser.add_argument("--train-nproc", type=positive_int, default=None,
                        help="processes per node for training (default: --nproc)")
    nodes = parser.add_argument_group("nodes (one iterate.py per node, the same flags but --node-rank)")
    nodes.add_argument("--nnodes", type=positive_int, default=1, help="nodes the run spans (default: %(default)s)")
    nodes.add_argument("--node-rank", type=int, default=0,
                       help="0 on the node that runs pairs and writes the done markers, 1 .. nnodes-1 on the others")
    nodes.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous every torchrun stage meets at "
                                               "(HOST: one of the nodes, as the others reach it)")
    nodes.add_argument("--rdzv-id", help="the run's name, the same on every node (default: the name of WORK)")
    parser.add_argument("--batch-size", type=positive_int, default=settings.SAMPLING_BATCH_SIZE,
                        help="generation batch per process (default: %(default)s)")
    parser.add_argument("--swap-pairs", action="store_true",
                        help="a control, not the method: every pair's chosen and rejected exchanged before training")
    tasks = parser.add_mutually_exclusive_group(required=True)  # the reference's rule is not lost by forgetting it
    tasks.add_argument("--translation-task-ids", metavar="FILE",
                       help="JSONL of the ids of prompts that are translation requests (their chosen answer stays "
                            "English; the AlpaGasus sets: ../shared/data/alpagasus/translation_task_ids.jsonl)")
    tasks.add_argument("--no-translation-tasks", action="store_true",
                       help="say that no prompt is a translation request (e.g. GSM8K)")
    parser.add_argument("--redo-from", choices=("generate", "translate", "pairs", "sdrrl", "train"),
                        help="where WORK's done stages were made from other inputs or settings (refused otherwise): "
                             "delete that stage's outputs and every later one's (only files lidr wrote) and redo them")
    add_flags(parser, settings.ANSWERS, title="answers: M_t answering the prompts (defaults: the paper's, "
                                              "lidr/settings.py ANSWERS)")
    add_flags(parser, settings.TRANSLATION, prefix="translate-", skip=("prompt_template",),
              title="self-translation (defaults: the paper's, lidr/settings.py TRANSLATION; a small model may loop on "
                    "the pre-filled <translated> tag without --translate-repetition-penalty)")
    add_flags(parser, PairOptions(), prefix="pairs-", skip=("dominant",), title="pair rules, --method lidr "
                                                                                 "(lidr/pairs.py)")
    add_flags(parser, SDRRLOptions(), prefix="sdrrl-", skip=("dominant",), title="SFT rows, --method sdrrl "
                                                                                  "(lidr/sdrrl.py)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    if not 0 <= args.node_rank < args.nnodes:
        parser.error(f"--node-rank {args.node_rank} is not in 0 .. {args.nnodes - 1} (--nnodes {args.nnodes})")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        parser.error(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT")
    trainer = argparse.ArgumentParser(prog="iterate.py ... --", description="the trainer's flags (train_dpo.py)")
    add_training_flags(trainer)
    return args, options_from(trainer.parse_args(argv[split + 1:]))


def recipe_from(args, training):
    """The Recipe the flags give (what `run` is called with)."""
    from lidr.iterate import Recipe  # torch: after the flags, so --help is quick

    return Recipe(
        langs=tuple(args.langs.split(",")), method=args.method,
        answers=from_flags(args, settings.ANSWERS), translation=from_flags(args, settings.TRANSLATION, "translate-"),
        pairs=replace(from_flags(args, PairOptions(), "pairs-"), dominant=args.dominant),
        sft_rows=replace(from_flags(args, SDRRLOptions(), "sdrrl-"), dominant=args.dominant),
        translation_task_ids=args.translation_task_ids, swap_pairs=args.swap_pairs, training=training)


@command()
def main(argv=None):
    args, training = parse_args(argv)
    if args.method == "lidr" and args.pairs_check_language:
        require_extra("py3langid", "langid", "--pairs-check-language")
    from lidr.harness.stages import Nodes
    from lidr.iterate import run

    nodes = Nodes(args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id or Path(args.work).resolve().name)
    return run(args.model, args.prompts.split(","), args.work, recipe_from(args, training), args.iterations,
               args.batch_size, args.nproc, args.train_nproc or args.nproc, nodes, args.redo_from)


if __name__ == "__main__":
    main()
