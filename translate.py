"""python translate.py: M_t translates its own answers (lidr/cli/translate.py; `python translate.py --help`)."""

from lidr.cli.translate import main

if __name__ == "__main__":
    main()
