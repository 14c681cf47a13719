"""Registration of the built-in checkpoint kinds (adapters register theirs on import)."""

from __future__ import annotations

from pathlib import Path

from merge_core.checkpoint.base import register_kind
from merge_core.checkpoint.safetensors_io import INDEX_NAME, SafetensorsReader, SafetensorsWriter, ShardedSafetensorsReader
from merge_core.checkpoint.torch_io import TORCH_SUFFIXES, TorchReader, TorchWriter


def _is_sharded(path: Path) -> bool:
    return (path.is_dir() and (path / INDEX_NAME).is_file()) or path.name == INDEX_NAME


register_kind(
    "torch",
    detect=lambda p: p.is_file() and p.suffix in TORCH_SUFFIXES,
    reader=TorchReader,
    writer=TorchWriter,
    writes=lambda p: p.suffix in TORCH_SUFFIXES,
)
register_kind(
    "safetensors",
    detect=lambda p: p.is_file() and p.suffix == ".safetensors",
    reader=SafetensorsReader,
    writer=SafetensorsWriter,
    writes=lambda p: p.suffix == ".safetensors" or p.suffix == "",
)
register_kind("safetensors-sharded", detect=_is_sharded, reader=ShardedSafetensorsReader)
