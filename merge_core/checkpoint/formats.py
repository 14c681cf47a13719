"""The built-in checkpoint kinds; toolkit plugins add theirs (:mod:`merge_core.plugins`)."""

from __future__ import annotations

from pathlib import Path

from merge_core.checkpoint.base import CheckpointKind, register_kind
from merge_core.checkpoint.safetensors_io import INDEX_NAME, SafetensorsReader, SafetensorsWriter, ShardedSafetensorsReader
from merge_core.checkpoint.torch_io import TORCH_SUFFIXES, TorchReader, TorchWriter


def _is_sharded(path: Path) -> bool:
    return (path.is_dir() and (path / INDEX_NAME).is_file()) or path.name == INDEX_NAME


register_kind(
    CheckpointKind(
        "torch",
        detect=lambda p: p.is_file() and p.suffix in TORCH_SUFFIXES,
        reader=TorchReader,
        writer=TorchWriter,
        writes=lambda p: p.suffix in TORCH_SUFFIXES,
        describes="a torch state dict or Lightning checkpoint (.pt, .pth, .bin, .ckpt)",
    )
)
register_kind(
    CheckpointKind(
        "safetensors",
        detect=lambda p: p.is_file() and p.suffix == ".safetensors",
        reader=SafetensorsReader,
        writer=SafetensorsWriter,
        writes=lambda p: p.suffix == ".safetensors" or p.suffix == "",
        describes="a .safetensors file, or a folder of shards when written",
    )
)
register_kind(
    CheckpointKind(
        "safetensors-sharded",
        detect=_is_sharded,
        reader=ShardedSafetensorsReader,
        describes="a folder of safetensors shards with model.safetensors.index.json",
    )
)
