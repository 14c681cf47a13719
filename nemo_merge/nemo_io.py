"""``.nemo`` archives as a checkpoint kind of the core's streaming engine.

A ``.nemo`` file is a tar (uncompressed since NeMo 1.7, gzip before) holding
``model_config.yaml``, ``model_weights.ckpt`` (a torch state dict) and artifacts
such as the tokenizer. Reading needs no NeMo import and no model instance: every
member is vetted first (no absolute paths, ``..``, links leaving the archive, device
files or FIFOs), then only the weights member is copied out to a private temporary
folder and memory-mapped with ``weights_only=True``. The merged ``.nemo`` is the
base's archive, member for member, with merged weights and an
``asr_merge_provenance.json`` added.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import posixpath
import shutil
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import yaml

from merge_core.atomic import discard, publish, temp_path
from merge_core.checkpoint.base import CheckpointKind, CheckpointReader, TensorSpec
from merge_core.checkpoint.torch_io import StagedWriter, TorchReader, save_staged_state_dict
from merge_core.errors import CheckpointError, TensorMismatchError
from merge_core.recipes.config import yaml_tree_problem

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"
PROVENANCE_MEMBER = "asr_merge_provenance.json"
# torch.save's zip archive; pickles of protocol 2 to 5 (legacy torch serialization)
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGICS = tuple(b"\x80" + bytes([protocol]) for protocol in range(2, 6))
# a compressed archive may expand to this many times its size (and never refused below MIN_BOMB_SIZE)
MAX_COMPRESSION_RATIO = 100
MIN_BOMB_SIZE = 64 << 20
# model configs of real models hold a few thousand values
MAX_CONFIG_VALUES = 100_000
# Config sections that define the network; experts may differ elsewhere (optim, data, augmentation)
ARCHITECTURE_KEYS = ("target", "preprocessor", "encoder", "decoder", "joint")


def _bare(name: str) -> str:
    """Member name without NeMo's leading ``./``."""
    return posixpath.normpath(name).lstrip("./") if name not in (".", "./") else ""


def unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why extracting ``member`` could write outside the destination, or None."""
    path = PurePosixPath(member.name)
    if path.is_absolute():
        return "absolute path"
    if ".." in path.parts:
        return "'..' in its path"
    if member.isdev() or member.isfifo():
        return "device file or FIFO"
    if member.issym() or member.islnk():
        link = PurePosixPath(member.linkname)
        # symlinks resolve from the member's folder, hard links from the archive root
        target = posixpath.normpath(posixpath.join(str(path.parent) if member.issym() else "", member.linkname))
        if link.is_absolute() or target == ".." or target.startswith("../"):
            return f"link to {member.linkname!r} outside the archive"
    return None


def open_nemo_tar(path: Path) -> tarfile.TarFile:
    """Open a ``.nemo`` tar (plain or compressed) and refuse it whole if any member is
    unsafe (:func:`unsafe_reason`), sparse, listed twice, or larger than the archive can
    hold. Members are vetted as they are read, so a decompression bomb is refused at
    its header, before the stream behind it is inflated."""
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a .nemo archive (not a readable tar file: {e})") from None
    try:
        _vet_members(tar, path)
    except (tarfile.TarError, OSError, EOFError) as e:
        tar.close()
        raise CheckpointError(f"{path}: not a .nemo archive (not a readable tar file: {e})") from None
    except CheckpointError:
        tar.close()
        raise
    return tar


def _vet_members(tar: tarfile.TarFile, path: Path) -> None:
    """Read the members one header at a time, raising CheckpointError at the first refused."""
    size = path.stat().st_size
    compressed = isinstance(tar.fileobj, (gzip.GzipFile, bz2.BZ2File, lzma.LZMAFile))
    # what the archive can hold: a plain tar its own bytes; a compressed one a bounded ratio
    # of them (float weights barely compress, a run of zeros ~1000x)
    capacity = max(MIN_BOMB_SIZE, MAX_COMPRESSION_RATIO * size) if compressed else size
    total, seen = 0, set()
    for member in tar:
        total += member.size
        reason = unsafe_reason(member)
        if reason is None and member.sparse is not None:
            reason = "sparse file: its holes would be written out as zeros of any size"
        elif reason is None and not member.isdir() and _bare(member.name) in seen:
            reason = "listed twice: which copy is meant is ambiguous"
        elif reason is None and total > capacity:
            reason = (f"its {member.size} bytes bring the members to {total} bytes, more than a "
                      f"{'compressed ' if compressed else ''}archive of {size} bytes can hold (a decompression bomb?)")
        if reason:
            raise CheckpointError(f"{path}: refusing unsafe archive member {member.name!r} ({reason})")
        seen.add(_bare(member.name))


def _find_member(tar: tarfile.TarFile, name: str, path: Path) -> tarfile.TarInfo:
    for member in tar.getmembers():
        if member.isfile() and _bare(member.name) == name:
            return member
    nested = [m.name for m in tar.getmembers() if posixpath.basename(m.name) == name]
    hint = f" (found {nested[0]!r}: model-parallel .nemo files are not supported)" if nested else ""
    raise CheckpointError(f"{path}: .nemo archive lacks {name}{hint}")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config keys that define the network (dropout rates excluded:
    fine-tuning runs may vary them)."""
    flat = _flatten({k: config[k] for k in ARCHITECTURE_KEYS if k in config})
    return {k: v for k, v in flat.items() if "dropout" not in k.rsplit(".", 1)[-1]}


class NemoReader(CheckpointReader):
    """A ``.nemo`` archive's weights, memory-mapped from a private temporary copy."""

    kind = "nemo"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tmp: Path | None = None
        with open_nemo_tar(self.path) as tar:
            config_member = _find_member(tar, CONFIG_MEMBER, self.path)
            weights_member = _find_member(tar, WEIGHTS_MEMBER, self.path)
            self.weights_member = weights_member.name
            self.config = self._read_config(tar, config_member)
            # a hidden folder named by temp_path, so the copy a killed run leaves behind
            # (the size of the weights) is removed by the next run that opens a .nemo
            self._tmp = temp_path(Path(tempfile.gettempdir()) / "asr-merge-nemo")
            self._tmp.mkdir()
            weights = self._tmp / WEIGHTS_MEMBER
            try:
                self._extract_weights(tar, weights_member, weights)
            except BaseException:
                self.close()
                raise
        try:
            self._weights = TorchReader(weights)
        except CheckpointError as e:
            self.close()
            raise CheckpointError(str(e).replace(str(weights), f"{self.path} (member {WEIGHTS_MEMBER})")) from None

    def _read_config(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict[str, Any]:
        where = f"{self.path} (member {CONFIG_MEMBER})"
        try:
            config = yaml.safe_load(tar.extractfile(member)) or {}
        except yaml.YAMLError as e:
            raise CheckpointError(f"{where}: unreadable YAML ({e})") from None
        except RecursionError:
            raise CheckpointError(f"{where}: unreadable YAML (nested too deeply)") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{where}: a model config must be a mapping, got {type(config).__name__}")
        # the config is flattened and compared with the template's: refuse what a walk cannot finish
        problem = yaml_tree_problem(config, MAX_CONFIG_VALUES)
        if problem:
            raise CheckpointError(f"{where}: a model config with {problem} is refused")
        return config

    def _extract_weights(self, tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
        """Copy the weights member to ``dest``, after checking it looks like a torch file and fits."""
        where = f"{self.path} (member {WEIGHTS_MEMBER})"
        free = shutil.disk_usage(dest.parent).free
        if member.size > free:
            raise CheckpointError(f"{where}: {member.size} bytes do not fit the {free} bytes free in {dest.parent}")
        # a compressed stream was read whole when the members were vetted: damage has shown already
        with tar.extractfile(member) as src:
            head = src.read(len(ZIP_MAGIC))
            if head != ZIP_MAGIC and head[:2] not in LEGACY_MAGICS:
                raise CheckpointError(f"{where}: not a torch checkpoint (neither a torch zip archive nor a pickle)")
            src.seek(0)
            with open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)

    def keys(self) -> list[str]:
        return self._weights.keys()

    def spec(self, name: str) -> TensorSpec:
        return self._weights.spec(name)

    def get(self, name: str) -> Any:
        return self._weights.get(name)

    def check_compatible_with(self, template: CheckpointReader) -> None:
        if not isinstance(template, NemoReader):
            return
        mine, theirs = architecture(self.config), architecture(template.config)
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key, "<absent>") != theirs.get(key, "<absent>"):
                raise TensorMismatchError(
                    f"{self.path}: model config differs from {template.path} at {key!r} "
                    f"({mine.get(key, '<absent>')!r} vs {theirs.get(key, '<absent>')!r})"
                )

    def close(self) -> None:
        if hasattr(self, "_weights"):
            self._weights.close()
        if self._tmp is not None:
            discard(self._tmp)


class NemoWriter(StagedWriter):
    """The base's archive with merged weights: every other member (config, tokenizer,
    artifacts) copied byte for byte, plus ``asr_merge_provenance.json``."""

    describes = ".nemo files"

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec], base: CheckpointReader | None, **options: Any) -> None:
        if not isinstance(base, NemoReader):
            raise CheckpointError(f"{path}: a .nemo output needs a .nemo base model (its config and tokenizer are copied)")
        super().__init__(path, specs, base, **options)
        self._weights_tmp = temp_path(self.path, ".ckpt")

    def commit(self, provenance: Mapping[str, Any]) -> list[Path]:
        staged = self.staged()
        try:
            save_staged_state_dict(staged, list(self.specs), self._weights_tmp)
        finally:
            discard(staged)
        try:
            self._write_archive(json.dumps(provenance, indent=2, sort_keys=True).encode())
        finally:
            discard(self._weights_tmp)
        publish(self._tmp, self.path)
        return [self.path]

    def _write_archive(self, provenance: bytes) -> None:
        base: NemoReader = self.base  # type: ignore[assignment]
        with open_nemo_tar(base.path) as src, tarfile.open(self._tmp, "w:") as dst:
            for member in src.getmembers():
                if _bare(member.name) == PROVENANCE_MEMBER:
                    continue  # the base was itself a merge: its record is replaced
                if member.name == base.weights_member:
                    info = dst.gettarinfo(str(self._weights_tmp), arcname=member.name)
                    info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, "", "", 0o644
                    with open(self._weights_tmp, "rb") as f:
                        dst.addfile(info, f)
                else:
                    dst.addfile(member, src.extractfile(member) if member.isfile() else None)
            prefix = "./" if base.weights_member.startswith("./") else ""
            info = tarfile.TarInfo(prefix + PROVENANCE_MEMBER)
            info.size, info.mtime, info.mode = len(provenance), int(time.time()), 0o644
            dst.addfile(info, io.BytesIO(provenance))

    def abort(self) -> None:
        super().abort()
        discard(self._weights_tmp)


def read_nemo_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance record inside a merged ``.nemo``, or None."""
    with open_nemo_tar(Path(path)) as tar:
        for member in tar.getmembers():
            if member.isfile() and _bare(member.name) == PROVENANCE_MEMBER:
                return json.load(tar.extractfile(member))
    return None


NEMO_KIND = CheckpointKind(
    NemoReader.kind,
    detect=lambda p: p.is_file() and p.suffix == ".nemo",
    reader=NemoReader,
    writer=NemoWriter,
    writes=lambda p: p.suffix == ".nemo",
    describes="a .nemo file",
)
