"""Checkpoint readers and writers behind one interface; adapters add their kinds."""

from merge_core.checkpoint.base import (
    CheckpointReader,
    CheckpointWriter,
    TensorSpec,
    create_writer,
    open_checkpoint,
    register_kind,
)

__all__ = ["CheckpointReader", "CheckpointWriter", "TensorSpec", "create_writer", "open_checkpoint", "register_kind"]
