"""``python -m kvpool``: the same entry point as the ``kvpool`` command."""

import sys

from kvpool.cli import main

sys.exit(main())
