"""`python -m mmpretrain ...` (the guard matters: checkpoint writers spawn processes)."""
import sys

from mmpretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
