"""Answer a file of prompts with a model: the command line of lidr/generation.py, `python -m lidr.generation`.

    python generate.py --model DIR --prompts IN.jsonl --out OUT.jsonl
    torchrun --standalone --nproc_per_node=8 generate.py --model DIR --prompts IN.jsonl --out OUT.jsonl

Its flags, the multi-node command and how it departs from the paper: lidr/generation.py.
"""

from lidr.generation import main

if __name__ == "__main__":
    main()
