"""``python -m conductance``: the same command line as ``conductance``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
