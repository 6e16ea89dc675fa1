"""python train_dpo.py: M_t -> M_{t+1} by DPO + NLL, or SFT (lidr/cli/train.py; `python train_dpo.py --help`)."""

from lidr.cli.train import main

if __name__ == "__main__":
    main()
