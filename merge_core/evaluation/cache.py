"""A cache of evaluation outputs, so an unchanged model on an unchanged test set
is decoded once.

One JSON file per key, in ``cache_dir()/eval`` by default. The key is the SHA-256
of a canonical JSON of three parts:

- the weights digest: what was evaluated (e.g. :func:`merge_core.checkpoint.provenance.file_sha256`
  of the checkpoint file);
- the manifest digest (:func:`manifest_digest`): what it was evaluated on. Audio
  files are identified by their manifest entries (path, duration, transcript), not by
  their bytes: re-encoding audio in place under the same paths does not change the
  key, so clear the cache after doing that;
- the decoding settings: everything else that changes the output (toolkit and its
  version, decoding strategy, beam size, language model, batch size where it matters).

Cache what decoding produced (hypotheses, or counts *and* the normalisation used):
a value is returned as stored and never re-validated against the parts.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from merge_core.atomic import write_atomically
from merge_core.errors import EvaluationError

# Bumped when the key's layout changes, so old entries stop matching instead of
# being read with a different meaning.
KEY_VERSION = 1

KeyParts = Sequence[Any]  # (weights digest, manifest digest, decoding settings)


def manifest_digest(path: str | Path) -> str:
    """SHA-256 of a manifest file's bytes.

    The manifest stands for the test set: audio is identified by its manifest
    entries, not hashed (see the module docstring).
    """
    path = Path(path)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise EvaluationError(f"{path}: cannot read manifest ({e.strerror or e})") from None


def canonical_json(value: Any, what: str) -> str:
    """JSON with sorted keys and no optional whitespace: equal values, equal text.

    >>> canonical_json({"b": 1, "a": [1.5, "x"]}, "example")
    '{"a":[1.5,"x"],"b":1}'
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise EvaluationError(f"{what} is not plain JSON ({e})") from None


def cache_key(weights_digest: str, manifest_digest: str, decoding: Mapping[str, Any]) -> str:
    """The hex SHA-256 naming one cache entry; any change to any part changes it."""
    for what, digest in (("weights digest", weights_digest), ("manifest digest", manifest_digest)):
        if not isinstance(digest, str) or not digest:
            raise EvaluationError(f"eval cache key: {what} must be a non-empty string, got {digest!r}")
    if not isinstance(decoding, Mapping):
        raise EvaluationError(f"eval cache key: decoding settings must be a mapping, got {type(decoding).__name__}")
    parts = {
        "version": KEY_VERSION,
        "weights": weights_digest,
        "manifest": manifest_digest,
        "decoding": dict(decoding),
    }
    return hashlib.sha256(canonical_json(parts, "eval cache key (decoding settings)").encode()).hexdigest()


def _key(key_parts: KeyParts) -> str:
    if isinstance(key_parts, (str, bytes, Mapping)) or len(key_parts) != 3:
        raise EvaluationError(
            "eval cache key parts must be (weights digest, manifest digest, decoding settings), "
            f"got {key_parts!r}"
        )
    return cache_key(*key_parts)


def _default_folder() -> Path:
    from merge_core.checkpoint.provenance import cache_dir

    return cache_dir() / "eval"


class EvalCache:
    """One JSON file per ``(weights digest, manifest digest, decoding settings)``.

    >>> import tempfile
    >>> cache = EvalCache(tempfile.mkdtemp())
    >>> parts = ("w" * 64, "m" * 64, {"strategy": "greedy"})
    >>> cache.get(parts) is None
    True
    >>> _ = cache.put(parts, {"hypotheses": ["a b"]})
    >>> cache.get(parts)
    {'hypotheses': ['a b']}
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else _default_folder()

    def path(self, key_parts: KeyParts) -> Path:
        """Where the entry for ``key_parts`` lives (whether or not it exists)."""
        return self.folder / f"{_key(key_parts)}.json"

    def get(self, key_parts: KeyParts) -> dict[str, Any] | None:
        """The stored value, or None on a miss. An unreadable entry is a miss (with a
        warning): it is recomputed and overwritten rather than failing the evaluation."""
        path = self.path(key_parts)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            warnings.warn(f"{path}: unreadable eval cache entry, treated as a miss ({e})", stacklevel=2)
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), dict):
            warnings.warn(f"{path}: malformed eval cache entry, treated as a miss", stacklevel=2)
            return None
        return entry["value"]

    def put(self, key_parts: KeyParts, value: Mapping[str, Any]) -> Path:
        """Store ``value`` (a JSON-able mapping) atomically; returns the entry's path.

        The key parts are stored beside the value so an entry can be told apart by
        reading it.
        """
        path = self.path(key_parts)
        if not isinstance(value, Mapping):
            raise EvaluationError(f"{path}: eval cache value must be a mapping, got {type(value).__name__}")
        weights, manifest, decoding = key_parts
        entry = {"key": {"weights": weights, "manifest": manifest, "decoding": dict(decoding)}, "value": dict(value)}
        text = canonical_json(entry, f"{path}: eval cache value")
        write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return path
