"""``python -m bench``: see ``bench._cli``."""
import sys

from bench._cli import main

if __name__ == "__main__":  # the guard matters: live runs spawn processes that import this
    sys.exit(main())
