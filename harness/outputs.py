"""Output files the tools write: checked before any work starts, never someone else's overwritten.

Every ``--json PATH`` (and the runner's report, the monitor's CSV and plot) goes through
``writable_target`` before the engine starts or polling begins: a folder that does not exist, a
path that is a directory, or a place that cannot be written (``/proc/x.json``, a read-only
folder) is one ``error:`` line and exit 2 then, not a traceback after a long run. An existing
file is replaced only when it is an earlier result of the same tool (``check_json_target``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.errors import UserError


def writable_target(flag: str, path: str | Path) -> Path:
    """``path`` as a file this process can write, or a one-line ``UserError`` naming ``flag``."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: folder {parent} does not exist")
    if target.exists() and not target.is_file():
        raise UserError(f"{flag} {path} is not a regular file")
    try:
        if target.exists():
            with target.open("ab"):  # opened for appending: nothing in it changes
                pass
        else:
            # Permissions alone do not tell (root, /proc, read-only mounts): create it, then remove it.
            with target.open("xb"):
                pass
            target.unlink()
    except OSError as exc:
        raise UserError(f"{flag} {path} cannot be written: {exc.strerror or exc}") from None
    return target


def check_json_target(
    flag: str, path: str | Path | None, is_ours: Callable[[Any], bool], what: str
) -> Path | None:
    """Fail before any work if ``path`` cannot be written, or would overwrite a file that is not
    an earlier result (``is_ours`` of its JSON) of ``what``."""
    if path is None or str(path) == "":
        return None
    target = writable_target(flag, path)
    if target.exists() and target.stat().st_size:
        try:
            ours = is_ours(json.loads(target.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError):
            ours = False
        if not ours:
            raise UserError(
                f"{flag} {path} exists and is not {what}: refusing to overwrite it (remove it or choose "
                "another name)"
            )
    return target


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` whole or not at all (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
