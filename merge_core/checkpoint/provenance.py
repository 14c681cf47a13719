"""What a merged checkpoint records about how it was made, and the input file hashes.

Hashing every input is a full read of it, so it runs on a background thread while
the merge reads the same pages (hashlib releases the GIL), and digests are cached
per (path, size, mtime, inode) so a file is hashed once across runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from merge_core.atomic import write_text_atomically

_CHUNK = 8 << 20


def cache_dir() -> Path:
    """``$ASR_MERGE_CACHE``, else ``$XDG_CACHE_HOME/asr-merge``, else ``~/.cache/asr-merge``."""
    if os.environ.get("ASR_MERGE_CACHE"):
        return Path(os.environ["ASR_MERGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asr-merge"


def _cache_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _load_cache(file: Path) -> dict[str, str]:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path: str | Path, use_cache: bool = True) -> str:
    """SHA-256 of a file's bytes, remembered across runs while the file is unchanged."""
    path = Path(path)
    store = cache_dir() / "sha256.json"
    key = _cache_key(path)
    if use_cache and key in (cached := _load_cache(store)):
        return cached[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if use_cache:
        try:
            cached = _load_cache(store)
            cached[key] = digest
            write_text_atomically(store, json.dumps(cached))
        except OSError:
            pass  # an unwritable cache only costs a re-hash next time
    return digest


def hash_in_background(paths: Iterable[Path]) -> tuple[ThreadPoolExecutor, dict[Path, Future[str]]]:
    """Start hashing ``paths`` on one worker thread; the caller shuts the pool down."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr-merge-hash")
    return pool, {p: pool.submit(file_sha256, p) for p in dict.fromkeys(paths)}


def package_version() -> str:
    from merge_core import __version__

    return __version__


def provenance_record(
    recipe: Mapping[str, Any],
    inputs: list[dict[str, Any]],
    tensors: Mapping[str, Any],
) -> dict[str, Any]:
    """The record stored with a merged output. ``inputs`` carry role, path, weight,
    files with sizes and sha256; ``tensors`` says what was merged and what was copied."""
    return {
        "tool": "asr-merge",
        "version": package_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "method": recipe["method"],
        "parameters": recipe["parameters"],
        "recipe": dict(recipe),
        "inputs": inputs,
        "tensors": dict(tensors),
    }
