"""`python -m gesco`: the command line client (see gesco/cli.py)."""
import sys

from gesco.cli import main

sys.exit(main())
