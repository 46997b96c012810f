"""``python -m newbie_core generate ...`` (see cli.py)."""

import sys

from .cli import main

sys.exit(main())
