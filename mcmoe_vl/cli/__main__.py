"""``python -m mcmoe_vl.cli``: the same as the ``mcmoe-vl`` command."""

import sys

from mcmoe_vl.cli import main

sys.exit(main())
