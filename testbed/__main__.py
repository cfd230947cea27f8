"""``python -m testbed``: the same as ``originpool testbed``."""

import sys

from testbed.cli import main

sys.exit(main())
