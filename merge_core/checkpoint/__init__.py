"""Checkpoint readers and writers behind one interface; toolkit plugins add their kinds."""

from merge_core.checkpoint.base import (
    CheckpointKind,
    CheckpointReader,
    CheckpointWriter,
    TensorSpec,
    create_writer,
    kinds,
    open_checkpoint,
    register_kind,
)

__all__ = ["CheckpointKind", "CheckpointReader", "CheckpointWriter", "TensorSpec", "create_writer", "kinds", "open_checkpoint", "register_kind"]
