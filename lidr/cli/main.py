"""lidr: one command for every stage, installed by `pip install` as the `lidr` script.

    lidr --help                                                    # the stages, one line each
    lidr generate --model M --prompts IN.jsonl --out OUT.jsonl     # = python generate.py ...
    lidr train --model M0 --data pairs.jsonl --out runs/M1         # = python train_dpo.py ...
    torchrun --standalone --nproc_per_node=8 -m lidr.cli.train ... # torchrun launches the module itself

`lidr NAME ARGS` runs the main of lidr/cli/NAME.py with ARGS: the same flags, outputs, messages
and exit status as `python -m lidr.cli.NAME ARGS` and the top-level scripts. Nothing here imports
torch, and no command's parser does: `--help` answers at once.
"""

import importlib
import sys

# the stages: the module lidr/cli/NAME.py, and the line `lidr --help` shows for it
COMMANDS = {
    "generate": "M_t answers the prompts of a file, or one prompt (= python generate.py)",
    "translate": "M_t translates a field of every row of a file (= python translate.py)",
    "pairs": "LIDR's preference pairs from one iteration folder (= python -m lidr.cli.pairs)",
    "sdrrl": "SDRRL's supervised rows from one iteration folder (= python -m lidr.cli.sdrrl)",
    "train": "M_t -> M_{t+1} by DPO + NLL, or SFT; one process or torchrun (= python train_dpo.py)",
    "iterate": "whole LIDR (or SDRRL) iterations, every stage kept on disk (= python iterate.py)",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(["usage: lidr COMMAND [ARGS ...]    (lidr COMMAND --help: its flags)", "",
                      "Language Imbalance Driven Rewarding (LIDR) and SDRRL, stage by stage.", "",
                      "commands:", *lines])


def main(argv=None):
    """Run `lidr NAME ARGS` (argv: NAME ARGS; default: the command line)."""
    command_line = argv is None
    argv = sys.argv[1:] if command_line else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return
    if not argv:
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        raise SystemExit(f"lidr: {name!r} is not a command; the commands are {', '.join(COMMANDS)} (lidr --help)")
    if command_line:
        sys.argv[0] = f"lidr {name}"  # argparse names the program after it: "usage: lidr train ..."
    importlib.import_module(f"lidr.cli.{name}").main(args)  # its result is not an exit status


if __name__ == "__main__":
    main()
