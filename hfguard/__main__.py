"""``python -m hfguard``: same as the ``hfguard`` command."""

import sys

from hfguard.cli import main

sys.exit(main())
