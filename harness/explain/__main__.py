"""``python -m harness.explain``: see ``harness.explain`` and ``harness.explain.cli``."""

import sys

from harness.explain.cli import main

if __name__ == "__main__":  # vLLM's engine process re-imports the main module: keep the guard
    sys.exit(main())
