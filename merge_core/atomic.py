"""Atomic writes: every file or folder the project publishes goes through this module.

A result is written under a hidden temporary name beside its destination (same file
system) and renamed into place only when complete, so a reader, or a rerun after a
crash, sees the old result or the whole new one, never a partial one.

A temporary is named ``.<dest name>.tmp-<host>-<pid>-<random>``: a process killed
mid-write (SIGKILL, power loss of a worker) leaves it behind, and the next write to
the same destination from this host removes the temporaries of processes that no
longer run (:func:`sweep_stale`). Publishing a folder swaps it in under an exclusive
``flock`` of the parent folder, so two runs publishing to one destination at once
each swap a whole folder in turn: the result is one run's output, never a mix. On
Linux the swap is one ``renameat2(RENAME_EXCHANGE)``, so a reader never even finds the
folder missing; elsewhere it is two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable, Iterator

from merge_core.errors import OutputError

# hostnames may hold characters that are awkward in file names; pids are per host
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_OLD = ".old"


def temp_path(dest: Path, suffix: str = "") -> Path:
    """A hidden sibling of ``dest`` (same file system, so the final rename is atomic);
    stale temporaries of ``dest`` are removed first."""
    sweep_stale(dest)
    return dest.parent / f".{dest.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_stale(dest: Path) -> list[Path]:
    """Remove the temporaries of ``dest`` left by dead processes of this host; returns them.

    A dead process's ``.old`` folder is its previous output, moved aside during a folder
    swap it did not finish: when ``dest`` is missing it is put back instead of removed.
    Temporaries of other hosts (a shared file system) are left alone: their pids mean
    nothing here.
    """
    prefix = f".{dest.name}.tmp-{_HOST}-"
    try:
        names = sorted(n for n in os.listdir(dest.parent) if n.startswith(prefix))
    except OSError:
        return []
    swept = []
    for name in names:
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        stale = dest.parent / name
        if name.endswith(_OLD) and not os.path.lexists(dest):
            with contextlib.suppress(OSError):
                os.rename(stale, dest)
                continue
        discard(stale)
        swept.append(stale)
    return swept


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` of ``folder`` (released when the process dies); where the
    file system has no locks, none is taken."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False
    where the system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    return renameat2 is not None and renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def publish(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` onto ``dest``. A file replaces atomically; a folder is swapped in
    by two renames under a lock of the parent folder, the old one removed only once the
    new one is in place."""
    if not tmp.is_dir():
        os.replace(tmp, dest)
        return
    with _folder_lock(dest.parent):
        if not os.path.lexists(dest):
            os.rename(tmp, dest)
            return
        if _exchange(tmp, dest):
            old = tmp
        else:
            old = temp_path(dest, _OLD)
            os.rename(dest, old)
            os.rename(tmp, dest)
    discard(old)


def discard(path: Path) -> None:
    """Remove a temporary file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def output_errors(dest: Path) -> Iterator[None]:
    """Turn a full disk or an unwritable folder met while writing ``dest`` into an
    :class:`OutputError` that names ``dest`` and its folder."""
    try:
        yield
    except OSError as e:
        if e.errno in _FULL:
            free = shutil.disk_usage(_existing(dest.parent)).free
            raise OutputError(
                f"{dest}: the disk holding {dest.parent} is full ({e.strerror}; {free / 2**20:.1f} MiB free); "
                "nothing was written there, any earlier output is untouched"
            ) from None
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise OutputError(f"{dest}: cannot write in {dest.parent} ({e.strerror})") from None
        raise


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def write_atomically(dest: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Call ``write(tmp)`` on a hidden sibling of ``dest`` (ending in ``suffix``, for writers
    that insist on one), then publish it onto ``dest``; on any error the sibling (a file or
    a folder) is removed and ``dest`` is left as it was."""
    with output_errors(dest):
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
