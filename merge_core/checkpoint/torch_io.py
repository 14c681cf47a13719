"""torch ``.pt``/``.bin``/``.ckpt`` state dicts and Lightning checkpoints (``state_dict`` entry).

Always loaded with ``weights_only=True`` and, for zip-format files, ``mmap=True``,
so tensors are views of the file until a method reads them.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open

from merge_core.atomic import discard, publish, temp_path
from merge_core.checkpoint.base import CheckpointReader, CheckpointWriter, TensorSpec
from merge_core.checkpoint.safetensors_io import SafetensorsWriter
from merge_core.errors import CheckpointError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
LIGHTNING_PROVENANCE_KEY = "asr_merge_provenance"
# Lightning entries that describe the base's training run, meaningless for a merge
_TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def load_weights_only(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``, memory-mapped when the format allows,
    with errors that name the file."""
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
        # legacy (pre-zip) serialization: cannot be memory-mapped, read it whole
        warnings.warn(f"{path}: legacy torch serialization, loading it into memory", stacklevel=2)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if not found:
            raise CheckpointError(f"{path}: unreadable or corrupt torch checkpoint ({unpickling_detail(e)})") from None
        raise CheckpointError(
            f"{path}: not a weights-only checkpoint (it holds a {found.group(1)} object); refusing to unpickle "
            "arbitrary objects. Re-save its tensors as a state dict or .safetensors."
        ) from None
    except Exception as e:  # a damaged pickle makes the unpickler raise almost anything (KeyError, struct.error...)
        raise CheckpointError(f"{path}: unreadable or corrupt torch checkpoint ({first_line(e)})") from None


def first_line(error: BaseException) -> str:
    """An exception's first line of text, or its type when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def unpickling_detail(error: pickle.UnpicklingError) -> str:
    """What a weights-only load refused, without torch's paragraphs about ``weights_only``."""
    paragraphs = [p.strip() for p in str(error).split("\n\n") if p.strip()]
    if len(paragraphs) > 1 and paragraphs[0].startswith("Weights only load failed"):
        return first_line(Exception(paragraphs[1]))
    return first_line(error)


def _state_dict_of(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensor mapping inside a loaded checkpoint, and whether it came from a
    Lightning ``state_dict`` entry."""
    lightning = isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)
    state = obj["state_dict"] if lightning else obj
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path}: holds no state dict (expected a mapping of tensor names to tensors)")
    for name, value in state.items():
        if not isinstance(name, str):  # the engine matches names against glob patterns
            raise CheckpointError(f"{path}: tensor name {name!r} is a {type(name).__name__}, not a string")
        if not isinstance(value, torch.Tensor):
            where = "state_dict entry" if lightning else "entry"
            raise CheckpointError(f"{path}: {where} {name!r} is a {type(value).__name__}, not a tensor")
    return dict(state), lightning


class TorchReader(CheckpointReader):
    kind = "torch"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.container = load_weights_only(self.path)
        self._state, self.lightning = _state_dict_of(self.container, self.path)
        if self.lightning:
            self.kind = "lightning"

    def keys(self) -> list[str]:
        return list(self._state)

    def spec(self, name: str) -> TensorSpec:
        t = self._state[name]
        return TensorSpec(tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]

    def close(self) -> None:
        self._state = {}
        self.container = None


def save_staged_state_dict(
    staged: Path, names: list[str], dest: Path, wrap: Callable[[dict[str, torch.Tensor]], Any] | None = None
) -> None:
    """``torch.save`` the tensors of a staged safetensors file, read from its memory
    map so they never become private memory; ``wrap`` builds the saved object."""
    with safe_open(str(staged), framework="pt") as f, open(dest, "wb") as out:
        state = {name: f.get_tensor(name) for name in names}
        # to a file object, not a path: torch names the zip's records after the file (here a
        # temporary, with host, pid and random digits), those of a file object "archive/",
        # so the same merge gives the same bytes on every run
        torch.save(wrap(state) if wrap else state, out)


class StagedWriter(CheckpointWriter):
    """Streams tensors into a hidden safetensors file beside the output, so the merged
    model is never held in private memory; at commit a subclass saves them in its own
    format from that file's memory map (:func:`save_staged_state_dict`) into ``_tmp``,
    which it then publishes."""

    describes = "this output kind"

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec], base: CheckpointReader | None, **options: Any) -> None:
        if options.get("shard_size"):
            raise CheckpointError(f"{path}: shard_size applies to safetensors output folders, not {self.describes}")
        super().__init__(path, specs, base)
        self._staging = SafetensorsWriter(temp_path(self.path, ".safetensors"), specs, base, in_place=True)
        self._tmp = temp_path(self.path)

    @property
    def order(self) -> list[str]:
        return self._staging.order

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._staging.write(name, tensor)

    def staged(self) -> Path:
        """Finish the staging file and return its path (the caller discards it)."""
        self._staging.commit({})
        return self._staging.path

    def abort(self) -> None:
        self._staging.abort()
        discard(self._staging.path)
        discard(self._tmp)


class TorchWriter(StagedWriter):
    """A ``torch.save`` of the merged state dict. A Lightning base yields a Lightning
    checkpoint (its training state dropped, provenance under ``asr_merge_provenance``);
    otherwise a plain state dict with a ``<output>.provenance.json`` beside it."""

    describes = "torch files"

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec], base: CheckpointReader | None, **options: Any) -> None:
        super().__init__(path, specs, base, **options)
        self._sidecar = self.path.with_name(self.path.name + ".provenance.json")
        self._sidecar_tmp = temp_path(self._sidecar)

    def commit(self, provenance: Mapping[str, Any]) -> list[Path]:
        staged = self.staged()
        lightning = isinstance(self.base, TorchReader) and self.base.lightning

        def as_lightning(state: dict[str, torch.Tensor]) -> dict[str, Any]:
            obj = {k: v for k, v in self.base.container.items() if k not in _TRAINING_STATE}
            return {**obj, "state_dict": state, LIGHTNING_PROVENANCE_KEY: json.dumps(provenance, sort_keys=True)}

        try:
            save_staged_state_dict(staged, list(self.specs), self._tmp, as_lightning if lightning else None)
        finally:
            discard(staged)
        if not lightning:
            self._sidecar_tmp.write_text(json.dumps(provenance, indent=2, sort_keys=True))
        publish(self._tmp, self.path)
        if lightning:
            return [self.path]
        publish(self._sidecar_tmp, self._sidecar)
        return [self.path, self._sidecar]

    def abort(self) -> None:
        super().abort()
        discard(self._sidecar_tmp)
