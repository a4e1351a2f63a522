"""python -m tracin: the command line."""

from .cli import console

if __name__ == "__main__":  # spawned Dask workers import the main module again: they must not run the CLI
    console()
