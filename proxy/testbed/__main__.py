"""``python -m proxy.testbed``: the same as ``originpool testbed``."""

import sys

from proxy.testbed.run import main

sys.exit(main())
