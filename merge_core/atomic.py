"""Atomic writes: every file or folder the project publishes goes through this module.

A result is written under a hidden temporary name beside its destination (same file
system) and renamed into place only when complete, so a reader, or a rerun after a
crash, sees the old result or the whole new one, never a partial one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


def temp_path(dest: Path, suffix: str = "") -> Path:
    """A hidden sibling of ``dest`` (same file system, so the final rename is atomic)."""
    return dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def publish(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` onto ``dest``. A file replaces atomically; a folder is swapped in
    by two renames, the old one removed only once the new one is in place."""
    if tmp.is_dir() and dest.exists():
        old = temp_path(dest, ".old")
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, dest)


def discard(path: Path) -> None:
    """Remove a temporary file or folder if it exists."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomically(dest: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Call ``write(tmp)`` on a hidden sibling of ``dest`` (ending in ``suffix``, for writers
    that insist on one), then publish it onto ``dest``; on any error the sibling (a file or
    a folder) is removed and ``dest`` is left as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest, suffix)
    try:
        write(tmp)
        publish(tmp, dest)
    except BaseException:
        discard(tmp)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``: readers see the old file or the whole new one."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
