"""`python -m gradproj.train ...`: the `gradproj` command line."""
import sys

from .cli import main

sys.exit(main())
