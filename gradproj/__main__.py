"""`python -m gradproj ...`: the same command line as the `gradproj` console script."""
import sys

from .train.cli import main

sys.exit(main())
