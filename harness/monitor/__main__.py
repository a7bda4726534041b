"""``python -m harness.monitor``: see ``harness.monitor`` and ``harness.monitor.cli``."""

import sys

from harness.monitor.cli import main

if __name__ == "__main__":
    sys.exit(main())
