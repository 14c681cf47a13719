"""SpeechBrain ``Checkpointer`` folders as a checkpoint kind of the core's streaming engine.

A checkpoint folder (``save/CKPT+2024-05-01+12-00-00+00``) holds ``CKPT.yaml`` (the
meta: ``unixtime``, ``end-of-epoch`` and whatever the recipe added, such as ``WER``)
and one ``<recoverable>.ckpt`` per recoverable. Reading needs no SpeechBrain import.

**Which recoverables are merged.** Those whose file is a torch zip archive that loads
with ``weights_only=True`` as a flat, non-empty mapping of names to tensors: what
SpeechBrain's default saver writes for an ``nn.Module`` (``model``, ``encoder``,
``ctc_lin``...). Everything else is copied from the base byte for byte: optimizer and
scheduler state (nested or numeric), ``EpochCounter``, the Brain's step counter and
dataloader positions (text files), ``InputNormalization`` statistics (a sample count
beside its tensors) and any file that is not weights-only (only its own class can
load it, so it is never unpickled here).

**Tensor names** are ``<recoverable>.<state dict key>``, e.g.
``model.1.encoder.layers.0.ffn_module1.1.ffn.0.weight``, so a recipe's ``include`` and
``exclude`` patterns select recoverables as well as parameters
(``include: ["model.*"]``, ``exclude: ["model.0.*"]``).

**Output**: a folder whose name starts with ``CKPT+`` (``save/CKPT+aode``), written
beside as a hidden folder and renamed into place when complete. It holds the merged
recoverables, every other file of the base, and a ``CKPT.yaml`` with a fresh
``unixtime`` (so ``Checkpointer.recover_if_possible()`` picks it as the most recent),
the base's ``end-of-epoch`` and the provenance record under ``asr_merge`` (with the
copied recoverables listed under ``copied_recoverables``). The base's
other meta keys (validation metrics such as ``WER``) describe the base, not the
merge, and are left out.
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from merge_core.atomic import discard, publish
from merge_core.checkpoint.base import CheckpointKind, CheckpointReader, TensorSpec
from merge_core.checkpoint.safetensors_io import INDEX_NAME
from merge_core.checkpoint.torch_io import StagedWriter, first_line, save_staged_state_dict
from merge_core.errors import CheckpointError, TensorMismatchError
from merge_core.recipes.config import yaml_tree_problem

# SpeechBrain's names (speechbrain.utils.checkpoints), repeated to keep this module import-free
CKPT_PREFIX = "CKPT"
META_FILE = f"{CKPT_PREFIX}.yaml"
PARAM_SUFFIX = ".ckpt"
OUTPUT_PREFIX = f"{CKPT_PREFIX}+"
PROVENANCE_KEY = "asr_merge"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since torch 1.6
MAX_META_VALUES = 10_000  # CKPT.yaml holds a handful of values


def checkpoint_folders(path: Path) -> list[Path]:
    """The ``CKPT+`` checkpoint folders directly inside a Checkpointer's save folder.

    >>> import tempfile
    >>> save = Path(tempfile.mkdtemp())
    >>> (save / "CKPT+a").mkdir(); _ = (save / "CKPT+a" / "CKPT.yaml").write_text("unixtime: 1")
    >>> [p.name for p in checkpoint_folders(save)]
    ['CKPT+a']
    """
    return sorted(
        p for p in path.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / META_FILE).is_file()
    )


def not_a_checkpoint_reason(path: Path) -> str | None:
    """Why ``path`` is not one Checkpointer checkpoint folder, or None when it is."""
    if not path.is_dir():
        return "not a folder"
    if (path / META_FILE).is_file():
        return None
    inside = checkpoint_folders(path)
    if inside:
        names = ", ".join(p.name for p in inside[:3]) + (", ..." if len(inside) > 3 else "")
        return f"a Checkpointer save folder holding {len(inside)} checkpoint(s) ({names}); name one of them"
    return f"not a SpeechBrain checkpoint folder (no {META_FILE})"


def _looks_like_speechbrain(path: Path) -> bool:
    """Folders this kind answers for, with a precise error when they are not valid."""
    if not path.is_dir() or (path / INDEX_NAME).is_file():
        return False
    return (
        path.name.startswith(CKPT_PREFIX)
        or (path / META_FILE).is_file()
        or any(p.suffix == PARAM_SUFFIX for p in path.iterdir())
        or bool(checkpoint_folders(path))
    )


def read_meta(folder: Path) -> dict[str, Any]:
    """``CKPT.yaml`` as a mapping; errors name the file."""
    meta_path = folder / META_FILE
    try:
        meta = yaml.safe_load(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint meta ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint meta (nested too deeply)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: checkpoint meta must be a mapping, got {type(meta).__name__}")
    # its values are copied into the merged meta: refuse what a walk cannot finish
    problem = yaml_tree_problem(meta, MAX_META_VALUES)
    if problem:
        raise CheckpointError(f"{meta_path}: checkpoint meta with {problem} is refused")
    return meta


def _is_torch_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC


def tensor_state_dict(path: Path) -> dict[str, torch.Tensor] | None:
    """The flat mapping of names to tensors stored in ``path`` (memory-mapped), or
    None when the file holds anything else. A torch archive that cannot be read at
    all is corrupt, and an error."""
    if not _is_torch_zip(path):
        return None  # text (EpochCounter, the Brain's step, dataloader positions) or legacy pickles
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        return None  # an object only its own class can load: copied, never unpickled here
    except Exception as e:  # a damaged pickle makes the unpickler raise almost anything (KeyError, struct.error...)
        raise CheckpointError(f"{path}: unreadable or corrupt recoverable file ({first_line(e)})") from None
    if (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return dict(obj)
    return None


class CheckpointerFolderReader(CheckpointReader):
    """One ``CKPT+`` folder: its tensor recoverables, namespaced ``<recoverable>.<key>``."""

    kind = "speechbrain-checkpointer"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        reason = not_a_checkpoint_reason(self.path)
        if reason:
            raise CheckpointError(f"{self.path}: {reason}")
        self.meta = read_meta(self.path)
        self.paramfiles = {p.stem: p for p in sorted(self.path.iterdir()) if p.suffix == PARAM_SUFFIX and p.is_file()}
        if not self.paramfiles:
            raise CheckpointError(f"{self.path}: checkpoint folder holds no <recoverable>{PARAM_SUFFIX} files")
        self._tensors: dict[str, torch.Tensor] = {}
        self.merged: dict[str, list[str]] = {}  # recoverable -> its namespaced tensor names
        for recoverable, file in self.paramfiles.items():
            state = tensor_state_dict(file)
            if state is not None:
                self._add(recoverable, state)
        if not self.merged:
            raise CheckpointError(
                f"{self.path}: no recoverable holds a tensor state dict "
                f"(recoverables: {', '.join(self.paramfiles)}), so there is nothing to merge"
            )

    def _add(self, recoverable: str, state: dict[str, torch.Tensor]) -> None:
        names = [f"{recoverable}.{key}" for key in state]
        # recoverable "a" with key "b.c" and recoverable "a.b" with key "c" would collide
        clash = next((n for n in names if n in self._tensors), None)
        if clash is not None:
            raise CheckpointError(f"{self.path}: tensor name {clash!r} arises from two recoverables")
        self.merged[recoverable] = names
        self._tensors.update(zip(names, state.values()))

    @property
    def copied(self) -> list[str]:
        """Recoverables that are not tensor state dicts: copied from the base as they are."""
        return [r for r in self.paramfiles if r not in self.merged]

    def keys(self) -> list[str]:
        return list(self._tensors)

    def spec(self, name: str) -> TensorSpec:
        t = self._tensors[name]
        return TensorSpec(tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def check_compatible_with(self, template: CheckpointReader) -> None:
        """Same recoverables as the template, tensor state dicts in both or in neither."""
        if not isinstance(template, CheckpointerFolderReader):
            return
        mine, theirs = set(self.paramfiles), set(template.paramfiles)
        if mine != theirs:
            parts = [f"missing {sorted(theirs - mine)}"] if theirs - mine else []
            parts += [f"extra {sorted(mine - theirs)}"] if mine - theirs else []
            raise TensorMismatchError(f"{self.path}: recoverables differ from {template.path}: {'; '.join(parts)}")
        kinds = [r for r in sorted(mine) if (r in self.merged) != (r in template.merged)]
        if kinds:
            raise TensorMismatchError(
                f"{self.path}: recoverable(s) {kinds} hold a tensor state dict here or in {template.path}, not in both"
            )

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.is_file())

    def close(self) -> None:
        self._tensors = {}


def write_meta(path: Path, meta: Mapping[str, Any]) -> None:
    """``CKPT.yaml`` as SpeechBrain's Checkpointer writes it."""
    path.write_text("# yamllint disable\n" + yaml.safe_dump(dict(meta)), encoding="utf-8")


def without_prefix(prefix: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The recoverable's own state dict from its namespaced tensors.

    >>> without_prefix("model.")({"model.0.w.bias": 1})
    {'0.w.bias': 1}
    """
    return lambda state: {name[len(prefix) :]: tensor for name, tensor in state.items()}


def _copy(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest, symlinks=True)
    else:
        shutil.copyfile(src, dest)


class CheckpointerFolderWriter(StagedWriter):
    """A ``CKPT+`` folder: merged recoverables saved with ``torch.save`` from a staged
    memory map, the base's other files copied, and a new ``CKPT.yaml``."""

    describes = "checkpoint folders"

    def __init__(
        self, path: Path, specs: Mapping[str, TensorSpec], base: CheckpointReader | None, **options: Any
    ) -> None:
        if not isinstance(base, CheckpointerFolderReader):
            raise CheckpointError(
                f"{path}: a {OUTPUT_PREFIX} output needs a SpeechBrain checkpoint folder as base model "
                "(its other recoverables and meta are copied)"
            )
        super().__init__(path, specs, base, **options)

    def commit(self, provenance: Mapping[str, Any]) -> list[Path]:
        staged = self.staged()
        self._tmp.mkdir()
        try:
            self._save_merged(staged)
        finally:
            discard(staged)
        self._copy_others()
        write_meta(self._tmp / META_FILE, self._meta(provenance))
        publish(self._tmp, self.path)
        return sorted(p for p in self.path.iterdir() if p.is_file())

    def _save_merged(self, staged: Path) -> None:
        base: CheckpointerFolderReader = self.base  # type: ignore[assignment]
        for recoverable, names in base.merged.items():
            dest = self._tmp / f"{recoverable}{PARAM_SUFFIX}"
            save_staged_state_dict(staged, names, dest, without_prefix(f"{recoverable}."))

    def _copy_others(self) -> None:
        base: CheckpointerFolderReader = self.base  # type: ignore[assignment]
        written = {f"{r}{PARAM_SUFFIX}" for r in base.merged} | {META_FILE}
        for entry in sorted(base.path.iterdir()):
            if entry.name not in written:
                _copy(entry, self._tmp / entry.name)

    def _meta(self, provenance: Mapping[str, Any]) -> dict[str, Any]:
        base: CheckpointerFolderReader = self.base  # type: ignore[assignment]
        return {
            "unixtime": time.time(),
            "end-of-epoch": base.meta.get("end-of-epoch", True),
            # a JSON round trip leaves plain types (torch.__version__ is a str subclass safe_dump refuses)
            PROVENANCE_KEY: json.loads(json.dumps({**provenance, "copied_recoverables": base.copied})),
        }



def read_checkpointer_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance record in a merged checkpoint folder's ``CKPT.yaml``, or None."""
    return read_meta(Path(path)).get(PROVENANCE_KEY)


CHECKPOINTER_KIND = CheckpointKind(
    CheckpointerFolderReader.kind,
    detect=_looks_like_speechbrain,
    reader=CheckpointerFolderReader,
    writer=CheckpointerFolderWriter,
    writes=lambda p: p.name.startswith(OUTPUT_PREFIX),
    describes="a SpeechBrain CKPT+ folder",
)
