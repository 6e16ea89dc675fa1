"""python iterate.py: LIDR iterations, every stage kept on disk (lidr/cli/iterate.py; `python iterate.py --help`)."""

from lidr.cli.iterate import main

if __name__ == "__main__":
    main()
