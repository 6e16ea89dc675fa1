"""Train M_t -> M_{t+1} on preference pairs with DPO + NLL (or SFT rows with --objective sft).

    python train_dpo.py --model M0 --data pairs.jsonl --out runs/M1
    torchrun --standalone --nproc_per_node=8 train_dpo.py --model M0 --data pairs.jsonl --out runs/M1

The flags set lidr/settings.py's Training (defaults: the paper's β and α, lidr's choices for the
rest); the loop, and how it departs from the paper, is lidr/train.py `train`; the loss is
lidr/dpo.py. Rerunning the same command resumes from OUT/checkpoint.
"""

from lidr.cli import command
from lidr.train import options_from, parse_args, train


@command()
def main(argv=None):
    args = parse_args(argv)
    train(args.model, args.data, args.out, options_from(args))


if __name__ == "__main__":
    main()
