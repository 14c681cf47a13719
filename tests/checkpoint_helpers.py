"""Checkpoints made for tests from real ones."""

from __future__ import annotations

from pathlib import Path

import torch

from merge_core.checkpoint import open_checkpoint
from merge_core.engine import write_stream


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (any kind), by name, in its stored order."""
    with open_checkpoint(path) as reader:
        return {name: reader.get(name).clone() for name in reader.keys()}


def scaled_copy(source: Path, dest: Path, prefix: str, factor: float = 50.0) -> Path:
    """``source`` (any checkpoint kind) written to ``dest`` with every float tensor whose
    name starts with ``prefix`` multiplied by ``factor``: a model with one layer destroyed."""
    with open_checkpoint(source) as reader:
        def stream(order):
            for name in order:
                tensor = reader.get(name)
                yield name, tensor * factor if name.startswith(prefix) and tensor.is_floating_point() else tensor

        write_stream(dest, {"method": "test", "parameters": {}}, [("base", reader, None)], reader, {}, stream, hash_inputs=False)
    return dest
