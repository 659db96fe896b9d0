"""``python -m prism_spec.bench``: the same command as ``prism bench``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
