"""`python -m plinth ...` (what `torchrun -m plinth` runs)."""
import sys

from plinth.cli import main

sys.exit(main())
