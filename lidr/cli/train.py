"""The trainer: M_t and its preference pairs -> M_{t+1} with DPO + NLL (LIDR), or SFT (SDRRL).

    python train_dpo.py --model M0 --data pairs.jsonl --out runs/M1                  # one process
    torchrun --standalone --nproc_per_node=8 -m lidr.cli.train --model M0 --data pairs.jsonl --out runs/M1
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB \\
        -m lidr.cli.train --model M0 --data pairs.jsonl --out runs/M1  # each node; OUT shared (lidr/harness/cluster.py)
    python train_dpo.py --objective sft --model M0 --data sft.jsonl --out runs/M0-sft  # SDRRL rows
    python train_dpo.py --dtype bfloat16 ...   # bf16 compute, fp32 master weights (the GPU default, on CPU)
    python train_dpo.py ... --plan --gpus 8 --gpu-memory 80   # will it fit? the per-GPU peak (lidr/harness/memory.py)

`python train_dpo.py` is `python -m lidr.cli.train`. Rows: {"prompt", "chosen", "rejected"} (DPO)
or {"prompt", "response"} (SFT), optional "system", "id", "lang", or TRL's formats (lidr/train_data.py). The flags set lidr/settings.py's
Training (defaults: the paper's β and α, lidr's choices for the rest). Rerunning the same command
resumes from OUT/checkpoint. The run, step by step, and its folder: lidr/harness/training.py; the
method: lidr/train.py; the loss: lidr/dpo.py; departures from the paper: docs/method.md §5.7.
"""

import argparse

from lidr.cli import add_flags, command, flags_argv, from_flags, positive_int, setting_type
from lidr.settings import TRAINING, Training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder of M_t (policy and reference)")
    p.add_argument("--data", required=True, help="the rows: JSONL, a JSON list, Parquet or a datasets save_to_disk "
                                                 "folder of {prompt, chosen, rejected} (dpo; or TRL's implicit-prompt "
                                                 "and conversational formats) or {prompt, response} (sft); README: "
                                                 "'Data and flags for TRL users'")
    p.add_argument("--out", help="run folder: checkpoint, reference log-probs, log, exported model (required but "
                                 "with --plan)")
    add_training_flags(p)
    fit = p.add_argument_group("plan: will it fit? (lidr/harness/memory.py; no weights are read, nothing is written)")
    fit.add_argument("--plan", action="store_true", help="print the per-GPU peak estimate and exit: 0 if it fits, "
                                                         "1 with the settings that would make it fit")
    fit.add_argument("--gpus", type=positive_int, help="GPUs the run spans, every node's (default: this machine's)")
    fit.add_argument("--gpu-memory", type=setting_type(float, {"above": 0}),
                     help="GB of memory per GPU (default: this machine's GPU, else 80)")
    args = p.parse_args(argv)
    if not args.plan and args.out is None:
        p.error("the following arguments are required: --out")
    return args


def add_training_flags(p: argparse.ArgumentParser):
    """One flag per field of Training (lidr/settings.py: its default, source and range)."""
    add_flags(p, TRAINING, title="training (lidr/settings.py TRAINING: the paper's β and α, lidr's choices for the rest)")


def options_from(args) -> Training:
    """The Training the flags give."""
    return from_flags(args, TRAINING)


def options_argv(options: Training) -> list[str]:
    """The flags that give `options` back (the inverse of parse_args and options_from), for torchrun launches."""
    return flags_argv(options)


@command()
def main(argv=None):
    args = parse_args(argv)
    from lidr.harness.training import plan_run, run  # torch: after the flags, so --help is quick

    if args.plan:
        plan_run(args.model, args.data, options_from(args), args.gpus, args.gpu_memory)
    else:
        run(args.model, args.data, args.out, options_from(args))


if __name__ == "__main__":
    main()
