"""python -m tracin.demo [OPTIONS]: the same as `tracin demo [OPTIONS]` (also python -m tracin demo)."""

import sys

from ..cli import console

if __name__ == "__main__":
    console(["demo", *sys.argv[1:]])
