"""Reader and writer interfaces every checkpoint kind implements, and their registry.

Readers give tensors one name at a time, lazily (memory-mapped where the format
allows), so the engine never holds a whole model. Writers take tensors in the
announced order and write them as they come, into a temporary file that only
:meth:`CheckpointWriter.commit` renames into place.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from merge_core.errors import CheckpointError


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class CheckpointReader(abc.ABC):
    """Read-only view of one checkpoint's tensors. Never modifies the file."""

    kind: str = "checkpoint"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Tensor names in stored order."""

    @abc.abstractmethod
    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype of ``name`` without reading its data."""

    @abc.abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``; may be backed by a read-only memory map."""

    def check_compatible_with(self, template: "CheckpointReader") -> None:
        """Kind-specific checks against the template beyond tensor names and shapes
        (a ``.nemo`` compares model configs); raise TensorMismatchError."""

    def files(self) -> list[Path]:
        """The files whose bytes make up this checkpoint (for sizes and hashes)."""
        return [self.path]

    def close(self) -> None:
        """Release file handles and maps."""

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CheckpointWriter(abc.ABC):
    """Writes tensors in the order given to the constructor, atomically."""

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec], base: CheckpointReader | None) -> None:
        self.path = Path(path)
        self.specs = dict(specs)
        self.base = base

    @property
    def order(self) -> list[str]:
        """The order tensors must be written in (a writer may lay them out its own way)."""
        return list(self.specs)

    @abc.abstractmethod
    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; names must come in ``specs`` order."""

    @abc.abstractmethod
    def commit(self, provenance: Mapping[str, Any]) -> list[Path]:
        """Store provenance, move the output into place; returns the written files."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Remove every temporary file; the destination is left as it was."""

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.abort()


@dataclass(frozen=True)
class CheckpointKind:
    """A checkpoint format: how to recognise, read and write it.

    ``detect(path)`` says whether an existing path is of this kind; ``writes(path)``
    whether an output path is; ``describes`` names it for people (``"a .nemo file"``).
    """

    name: str
    detect: Callable[[Path], bool]
    reader: Callable[[Path], CheckpointReader] | None = None
    writer: Callable[..., CheckpointWriter] | None = None
    writes: Callable[[Path], bool] | None = None
    describes: str = ""


_KINDS: list[CheckpointKind] = []


def register_kind(kind: CheckpointKind) -> None:
    """Register a checkpoint kind. Kinds registered later are tried first, so a
    toolkit's (``.nemo``, SpeechBrain ``CKPT+`` folders) can claim paths before the
    generic torch reader does. Toolkit plugins' kinds are registered on discovery
    (:mod:`merge_core.plugins`)."""
    if any(k.name == kind.name for k in _KINDS):
        raise ValueError(f"checkpoint kind {kind.name!r} is registered twice")
    _KINDS.insert(0, kind)


def _kinds() -> Iterator[CheckpointKind]:
    import merge_core.checkpoint.formats  # noqa: F401  (registers the built-in kinds)
    from merge_core.plugins import toolkits

    toolkits()  # discovering the plugins registers their kinds
    yield from list(_KINDS)


def kinds() -> list[CheckpointKind]:
    """Every registered kind, in the order paths are matched against them."""
    return list(_kinds())


def _missing_toolkits() -> str:
    from merge_core.plugins import unavailable_toolkits

    broken = unavailable_toolkits()
    return "".join(f"; toolkit {name} could not be loaded ({why})" for name, why in broken.items())


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open ``path`` with the first registered reader that recognises it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    for kind in _kinds():
        if kind.reader is not None and kind.detect(path):
            return kind.reader(path)
    known = ", ".join(k.name for k in _kinds())
    raise CheckpointError(f"{path}: not a checkpoint this tool can read ({known}){_missing_toolkits()}")


def create_writer(
    path: str | Path, specs: Mapping[str, TensorSpec], base: CheckpointReader | None, **options: Any
) -> CheckpointWriter:
    """A writer for the output ``path``, chosen by the first kind whose ``writes`` accepts it."""
    path = Path(path)
    for kind in _kinds():
        if kind.writer is not None and kind.writes is not None and kind.writes(path):
            return kind.writer(path, specs, base, **options)
    writable = ", ".join(k.name for k in _kinds() if k.writer is not None)
    raise CheckpointError(f"{path}: no writer for this output (writable kinds: {writable}){_missing_toolkits()}")


def check_order(specs: Sequence[str], position: int, name: str, path: Path) -> None:
    """Writers stream, so tensors must arrive in the announced order."""
    if position >= len(specs) or specs[position] != name:
        expected = specs[position] if position < len(specs) else "nothing more"
        raise CheckpointError(f"{path}: tensor {name!r} written out of order (expected {expected!r})")
