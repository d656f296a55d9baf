"""``python -m pvbus`` is the ``pvbus`` command."""

import sys

from .cli import main

sys.exit(main())
