"""``python -m sparse_kd.cli``: what torchrun runs when a command re-launches itself."""

import sys

from sparse_kd.cli import main

sys.exit(main())
