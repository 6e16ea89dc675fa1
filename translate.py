"""Self-translation (LIDR step 3): the command line of lidr/translation.py, `python -m lidr.translation`.

    python translate.py --model M0 --in runs/lidr/iter1/generate/en.jsonl --field response --to fr \\
        --out runs/lidr/iter1/translate/en-fr.jsonl
    torchrun --standalone --nproc_per_node=8 translate.py ...            # data parallel, like generate.py

Its flags, the multi-node command and how it departs from the paper: lidr/translation.py.
"""

from lidr.translation import main

if __name__ == "__main__":
    main()
