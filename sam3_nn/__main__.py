"""``python -m sam3_nn``: the command line (sam3_nn.cli)."""

import sys

from sam3_nn.cli import main

sys.exit(main())
