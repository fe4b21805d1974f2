"""`python -m compute.cli`: the `engram` command without the console script."""
import sys

from compute.cli import main

sys.exit(main())
