"""``python -m proxy.testbed``: the same as ``originpool testbed``."""

import sys

from proxy.testbed.cli import main

sys.exit(main())
