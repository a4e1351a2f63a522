"""python -m tracin: the command line."""

import sys

from .cli import main

if __name__ == "__main__":  # spawned Dask workers import the main module again: they must not run the CLI
    sys.exit(main())
