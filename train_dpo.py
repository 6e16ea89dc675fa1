"""Train M_t -> M_{t+1} on preference pairs with DPO + NLL (or SFT rows with --objective sft).

    python train_dpo.py --model M0 --data pairs.jsonl --out runs/M1
    torchrun --standalone --nproc_per_node=8 train_dpo.py --model M0 --data pairs.jsonl --out runs/M1

    python train_dpo.py --model M0 --data pairs.jsonl --plan --gpus 8 --gpu-memory 80   # will it fit?

`python train_dpo.py` is `python -m lidr.train` (the multi-node command is in lidr/train.py; the
memory plan in lidr/memory.py).

The flags set lidr/settings.py's Training (defaults: the paper's β and α, lidr's choices for the
rest); the loop, and how it departs from the paper, is lidr/train.py `train`; the loss is
lidr/dpo.py. Rerunning the same command resumes from OUT/checkpoint.
"""

from lidr.train import main

if __name__ == "__main__":
    main()
