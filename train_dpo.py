"""Train M_t -> M_{t+1} on preference pairs with DPO + NLL (or SFT rows with --objective sft).

    python train_dpo.py --model M0 --data pairs.jsonl --out runs/M1
    torchrun --standalone --nproc_per_node=8 train_dpo.py --model M0 --data pairs.jsonl --out runs/M1

The loop, its flags and how it departs from the paper are described in lidr/train.py; the loss
in lidr/dpo.py. Rerunning the same command resumes from OUT/checkpoint.
"""

from lidr.train import main

if __name__ == "__main__":
    main()
