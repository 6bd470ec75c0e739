"""``python -m leverlm.demo_models``: see :mod:`leverlm.demo_models.cli`."""

import sys

from leverlm.demo_models.cli import main

sys.exit(main())
