"""``.safetensors`` files, single or sharded with a ``model.safetensors.index.json``.

Reading goes through ``safe_open``, whose tensors are views of a memory map.
Writing streams: the header is fixed before the first tensor (shapes and dtypes
are known from the base), tensors are appended as they are produced, and the
provenance goes into the header's ``__metadata__`` (space reserved up front) or,
for shards, into the index.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Mapping

import torch
from safetensors import safe_open

from merge_core.atomic import discard, publish, temp_path
from merge_core.checkpoint.base import CheckpointReader, CheckpointWriter, TensorSpec, check_order
from merge_core.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
PROVENANCE_KEY = "asr_merge"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        raise CheckpointError(f"{path}: unreadable or corrupt safetensors file ({e})") from None


def _spec(handle: Any, name: str, path: Path) -> TensorSpec:
    try:
        view = handle.get_slice(name)
    except Exception as e:  # a shard the index names for a tensor it does not hold
        raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None
    dtype = view.get_dtype()
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    return TensorSpec(tuple(view.get_shape()), DTYPES[dtype])


class SafetensorsReader(CheckpointReader):
    kind = "safetensors"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._handle = _open(self.path)
        self._keys = list(self._handle.keys())
        if not self._keys:
            raise CheckpointError(f"{self.path}: safetensors file holds no tensors")
        self.metadata: dict[str, str] = self._handle.metadata() or {}

    def keys(self) -> list[str]:
        return self._keys

    def spec(self, name: str) -> TensorSpec:
        return _spec(self._handle, name, self.path)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({e})") from None

    def close(self) -> None:
        self._handle = None


def _inside(shard: str) -> bool:
    """Whether an index's shard name stays inside the index's folder (no absolute path, no '..')."""
    parts = PurePosixPath(shard).parts
    return bool(parts) and not PurePosixPath(shard).is_absolute() and ".." not in parts


class ShardedSafetensorsReader(CheckpointReader):
    """A folder (or its index file) of safetensors shards named by a weight map."""

    kind = "safetensors-sharded"

    def __init__(self, path: Path) -> None:
        index = path / INDEX_NAME if path.is_dir() else path
        super().__init__(index.parent)
        try:
            self.index = json.loads(index.read_text())
            weight_map: dict[str, str] = self.index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files, got {weight_map!r:.80}")
        self._shard_of = weight_map
        self._handles: dict[str, Any] = {}
        for shard in weight_map.values():
            if not isinstance(shard, str) or not _inside(shard):
                raise CheckpointError(f"{index}: shard {shard!r} is not a file name inside {self.path}")
        for shard in dict.fromkeys(weight_map.values()):
            if not (self.path / shard).is_file():
                raise CheckpointError(f"{index}: shard {shard!r} is missing")

    def _handle(self, name: str) -> tuple[Any, Path]:
        try:
            shard = self._shard_of[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in the index") from None
        if shard not in self._handles:
            self._handles[shard] = _open(self.path / shard)
        return self._handles[shard], self.path / shard

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def spec(self, name: str) -> TensorSpec:
        handle, path = self._handle(name)
        return _spec(handle, name, path)

    def get(self, name: str) -> torch.Tensor:
        handle, path = self._handle(name)
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None

    def files(self) -> list[Path]:
        return [self.path / INDEX_NAME] + [self.path / s for s in dict.fromkeys(self._shard_of.values())]

    def close(self) -> None:
        self._handles.clear()


def tensor_header(specs: Mapping[str, TensorSpec]) -> dict[str, Any]:
    """safetensors header entries for ``specs`` laid out contiguously in their order."""
    header: dict[str, Any] = {}
    offset = 0
    for name, spec in specs.items():
        header[name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    return header


def _encoded_header(header: Mapping[str, Any], size: int | None = None) -> bytes:
    """8-byte length + JSON, space-padded to ``size`` (or to a multiple of 8), as the format allows."""
    text = json.dumps(header, separators=(",", ":")).encode()
    target = size if size is not None else (len(text) + 7) // 8 * 8
    if len(text) > target:
        raise ValueError("header larger than the space reserved for it")
    return struct.pack("<Q", target) + text + b" " * (target - len(text))


def write_tensor_bytes(f: BinaryIO, tensor: torch.Tensor) -> None:
    """Append a tensor's raw little-endian bytes."""
    f.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


class _StreamingFile:
    """One safetensors file written tensor by tensor, header space reserved up front."""

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec], reserve: int) -> None:
        self.path = path
        self.specs = dict(specs)
        self.names = list(self.specs)
        self.header = tensor_header(self.specs)
        self.header_size = len(_encoded_header(self.header)) - 8 + reserve
        self.header_size = (self.header_size + 7) // 8 * 8
        self.written = 0
        self._f = open(path, "wb")
        self._f.seek(8 + self.header_size)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        check_order(self.names, self.written, name, self.path)
        spec = self.specs[name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"announced as {spec.shape} {spec.dtype}"
            )
        write_tensor_bytes(self._f, tensor)
        self.written += 1

    def finish(self, metadata: Mapping[str, str] | None) -> None:
        if self.written != len(self.names):
            raise CheckpointError(f"{self.path}: {len(self.names) - self.written} tensor(s) were never written")
        header = {"__metadata__": dict(metadata)} if metadata else {}
        header.update(self.header)
        try:
            encoded = _encoded_header(header, self.header_size)
        except ValueError:
            self._rewrite_with_header(header)
            return
        self._f.seek(0)
        self._f.write(encoded)
        self._f.close()

    def _rewrite_with_header(self, header: Mapping[str, Any]) -> None:
        # provenance outgrew the reserved space: copy the data behind a larger header
        self._f.close()
        # self.path is a temporary (or inside one): a temp_path of it would be a temporary of
        # a temporary, which no sweep matches; a suffix keeps the name a temporary of the
        # same destination, swept with it if the process dies
        bigger = self.path.with_name(f"{self.path.name}.header")
        try:
            with open(self.path, "rb") as src, open(bigger, "wb") as dst:
                dst.write(_encoded_header(header))
                src.seek(8 + self.header_size)
                shutil.copyfileobj(src, dst, 16 << 20)
            publish(bigger, self.path)
        except BaseException:
            discard(bigger)
            raise

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def alignment_order(specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """Widest dtype first, then by name: the layout ``safetensors.torch.save_file``
    writes, which keeps every tensor aligned for zero-copy memory mapping."""
    return dict(sorted(specs.items(), key=lambda kv: (-kv[1].dtype.itemsize, kv[0])))


class SafetensorsWriter(CheckpointWriter):
    """Writes one ``.safetensors`` file, or, for an output folder, shards of at most
    ``shard_size`` bytes (one shard when unset) and a ``model.safetensors.index.json``.

    ``in_place``: ``path`` is a file that is itself a temporary of the caller's (made by
    :func:`merge_core.atomic.temp_path`), written directly. A temporary of a temporary
    (``..out.tmp-...tmp-...``) would match no destination's sweep, so a killed run would
    leave it for good."""

    def __init__(
        self,
        path: Path,
        specs: Mapping[str, TensorSpec],
        base: CheckpointReader | None,
        *,
        shard_size: int | None = None,
        provenance_reserve: int = 1 << 16,
        in_place: bool = False,
    ) -> None:
        super().__init__(path, alignment_order(specs), base)
        sharded = self.path.suffix != ".safetensors"
        if shard_size is not None and not sharded:
            raise CheckpointError(f"{path}: shard_size needs a folder as output, not a .safetensors file")
        if in_place and sharded:
            raise CheckpointError(f"{path}: only a .safetensors file is written in place")
        self._tmp = self.path if in_place else temp_path(self.path)
        self._files: list[_StreamingFile] = []
        self._shard_of: dict[str, int] = {}
        if not sharded:
            self._files.append(_StreamingFile(self._tmp, self.specs, provenance_reserve))
            self._shard_of = dict.fromkeys(self.specs, 0)
        else:
            self._tmp.mkdir()
            groups = _shard_groups(self.specs, shard_size or sum(s.nbytes for s in self.specs.values()))
            for i, group in enumerate(groups):
                name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                self._files.append(_StreamingFile(self._tmp / name, group, 0))
                self._shard_of.update(dict.fromkeys(group, i))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._shard_of:
            raise CheckpointError(f"{self.path}: tensor {name!r} was not announced")
        self._files[self._shard_of[name]].write(name, tensor)

    def commit(self, provenance: Mapping[str, Any]) -> list[Path]:
        record = json.dumps(provenance, sort_keys=True)
        if len(self._files) == 1 and not self._tmp.is_dir():
            self._files[0].finish({"format": "pt", PROVENANCE_KEY: record})
            if self._tmp != self.path:
                publish(self._tmp, self.path)
            return [self.path]
        for f in self._files:
            f.finish({"format": "pt"})
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in self.specs.values()), PROVENANCE_KEY: record},
            "weight_map": {name: self._files[i].path.name for name, i in sorted(self._shard_of.items())},
        }
        (self._tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        publish(self._tmp, self.path)
        return [self.path / INDEX_NAME] + [self.path / f.path.name for f in self._files]

    def abort(self) -> None:
        for f in self._files:
            f.close()
        discard(self._tmp)


def _shard_groups(specs: Mapping[str, TensorSpec], shard_size: int) -> list[dict[str, TensorSpec]]:
    groups: list[dict[str, TensorSpec]] = [{}]
    size = 0
    for name, spec in specs.items():
        if groups[-1] and size + spec.nbytes > shard_size:
            groups.append({})
            size = 0
        groups[-1][name] = spec
        size += spec.nbytes
    return groups


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance record stored in a merged safetensors file or sharded folder."""
    path = Path(path)
    if path.is_dir() or path.name == INDEX_NAME:
        index = path / INDEX_NAME if path.is_dir() else path
        record = json.loads(index.read_text()).get("metadata", {}).get(PROVENANCE_KEY)
    else:
        with safe_open(str(path), framework="pt") as f:
            record = (f.metadata() or {}).get(PROVENANCE_KEY)
    return None if record is None else json.loads(record)
