"""Temporary paths beside the destination and the rename that publishes them."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


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
