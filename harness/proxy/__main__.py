"""``python -m harness.proxy``: see harness/proxy/__init__.py."""

import sys

from harness.proxy.cli import main

if __name__ == "__main__":  # the analysis process (spawn) imports this module again: no second proxy
    sys.exit(main())
