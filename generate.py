"""python generate.py: M_t answers prompts (lidr/cli/generate.py; `python generate.py --help`)."""

from lidr.cli.generate import main

if __name__ == "__main__":
    main()
