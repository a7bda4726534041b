"""The shared harness of the lessons and tools (one module per concern; see README "Layout").

Importing it from a Python that lacks the project's stack (no vLLM), when the project's own
environment ``.venv`` exists (``python setup_and_test.py`` makes it), restarts the same command
in ``.venv``: ``python run_all_examples.py`` or ``python -m harness.explain LOG`` then work from
whatever Python a reader types them with, and that Python is never changed. Set
``KVCACHE_LESSONS_NO_VENV=1`` to run as is.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

_VENV = Path(__file__).resolve().parent.parent / ".venv"


def _use_project_venv() -> None:
    python = _VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if os.environ.get("KVCACHE_LESSONS_NO_VENV") or not python.exists():
        return
    if Path(sys.prefix).resolve() == _VENV.resolve() or importlib.util.find_spec("vllm") is not None:
        return  # in .venv already, or an interpreter set up with --in-place
    os.environ["KVCACHE_LESSONS_NO_VENV"] = "1"  # the restarted command runs as it is
    os.execv(str(python), [str(python), *sys.orig_argv[1:]])


_use_project_venv()
