"""python -m tracin: the command line."""

import sys

from .cli import main

sys.exit(main())
