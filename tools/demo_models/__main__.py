"""``python -m tools.demo_models``: see :mod:`tools.demo_models.cli`."""

import sys

from tools.demo_models.cli import main

sys.exit(main())
