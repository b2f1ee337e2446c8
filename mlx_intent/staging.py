"""Folders written whole (a converted model, an adapter, a trained head): built in a staging folder beside the
target, ``.<name>.<pid>.<random>.partial``, and renamed into place at the end.

A failed or interrupted run removes its own staging folder, but a killed one (SIGKILL, a power cut) cannot,
and each one left holds a whole model (81 MB for SmolLM2).  ``clean_stale`` removes those at the start of the
next ``models convert``, ``models pull`` or ``train``: the pid in the name tells a folder still being written
from one whose writer is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# A staging folder without a pid in its name (made before pids were recorded) counts as stale after this.
STALE_AFTER_S = 3600.0
_NAME = re.compile(r"\..+?(?:\.(\d+))?\.[a-z0-9_]+\.partial")


def staging_dir(out_dir: Path) -> Path:
    """A new private folder beside ``out_dir`` (its parents made), named for this process."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", suffix=".partial", dir=out_dir.parent))


def _alive(pid: int) -> bool:
    if pid < 1:
        return False
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except PermissionError:  # it does, and is another user's
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def is_stale(path: Path, now: float | None = None) -> bool:
    """A staging folder whose writer is gone: its pid is not a live process (never this one's), or it has no pid
    and is older than STALE_AFTER_S."""
    m = _NAME.fullmatch(path.name)
    if m is None or not path.is_dir() or path.is_symlink():
        return False
    if m[1] is not None:
        return int(m[1]) != os.getpid() and not _alive(int(m[1]))
    age = (time.time() if now is None else now) - path.stat().st_mtime
    return age > STALE_AFTER_S


def clean_stale(folder: Path, note: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the stale staging folders straight in ``folder`` (none if it does not exist); ``note`` is told
    about each one.  Returns what was removed."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    removed = []
    for path in sorted(entries):
        if path.name.endswith(".partial") and is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            if note is not None:
                note(f"removed {path}, left by an interrupted run")
    return removed
