"""`python -m mossserve`: the `mossserve` command."""
import sys

from .cli import main

sys.exit(main())
