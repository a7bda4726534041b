"""The shared harness of the lessons and tools (one module per concern; see README "Layout").

Importing it from a Python that lacks the project's stack (no vLLM), when the project's own
environment ``.venv`` exists (``python setup_and_test.py`` makes it), restarts the same command
in ``.venv``: ``python run_all_examples.py`` or ``python -m harness.explain LOG`` then work from
whatever Python a reader types them with, and that Python is never changed. Set
``KVCACHE_LESSONS_NO_VENV=1`` to run as is.

Before the setup (no ``.venv`` yet) a script's first imports fail in a Python without the
packages: that is one line, ``error: this Python lacks the lessons' packages (No module named
'rich'): run `python setup_and_test.py` first ...``, and exit status 2, not a traceback. Every
entry point imports this package before anything else, so the hook installed here covers them
all, ``--help`` included; a package missing later, inside a command, is the same line through
``harness.cli.run_cli``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import TracebackType

from harness.errors import missing_module_is_ours, setup_first

_ROOT = Path(__file__).resolve().parent.parent
_VENV = _ROOT / ".venv"


def _use_project_venv() -> None:
    python = _VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if os.environ.get("KVCACHE_LESSONS_NO_VENV") or not python.exists():
        return
    if in_project_venv() or importlib.util.find_spec("vllm") is not None:
        return  # in .venv already, or an interpreter set up with --in-place
    os.environ["KVCACHE_LESSONS_NO_VENV"] = "1"  # the restarted command runs as it is
    os.execv(str(python), [str(python), *sys.orig_argv[1:]])


def in_project_venv() -> bool:
    """Whether this Python is the project's ``.venv``."""
    return _VENV.exists() and Path(sys.prefix).resolve() == _VENV.resolve()


def _at_import_time(tb: TracebackType | None) -> bool:
    """Whether the project's code on this traceback was all module level: the failure came
    while a script was importing, before it started anything (servers, engines, files)."""
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name != "<module>" and _is_project_file(code.co_filename):
            return False
        tb = tb.tb_next
    return True


def _is_project_file(filename: str) -> bool:
    if filename.startswith("<"):  # "<frozen runpy>", "<string>": Python's own
        return False
    path = Path(filename).resolve()
    return path.is_relative_to(_ROOT) and not path.is_relative_to(_VENV)


def _setup_first_hook() -> None:
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if isinstance(exc, ModuleNotFoundError) and not missing_module_is_ours(exc) and _at_import_time(tb):
            sys.stdout.flush()
            print(f"error: {setup_first(exc, in_project_venv())}", file=sys.stderr, flush=True)
            # The status of bad input (the default after an uncaught exception is 1). Nothing has
            # started yet that an exit handler would have to stop.
            os._exit(2)
        previous(kind, exc, tb)

    sys.excepthook = hook


def _require_rich() -> None:
    """Every entry point needs ``rich`` before it can print anything (``--help`` of the
    explainer and the monitor included, which import the rest later, inside ``main``)."""
    if importlib.util.find_spec("rich") is None:
        missing = ModuleNotFoundError("No module named 'rich'", name="rich")
        print(f"error: {setup_first(missing, in_project_venv())}", file=sys.stderr, flush=True)
        raise SystemExit(2)


_use_project_venv()
_require_rich()
_setup_first_hook()
