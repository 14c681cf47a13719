"""Weights-only snapshots along one fine-tuning trajectory, for MAST.

MAST (Ducorroy and Riad, "Robust fine-tuning of speech recognition models via model merging: application to disordered speech",
Sec. 3: "Merging Along a Single Trajectory") averages checkpoints
saved during one fine-tuning run. A snapshot here is the model's state dict (LoRA
already folded by the caller) as one ``.safetensors`` file, written to a hidden
temporary file and renamed into place, so a crash never leaves a half-written
snapshot; ``asr-merge merge`` reads it like any other member.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from merge_core.atomic import write_atomically


def snapshot_name(*, step: int | None = None, epoch: int | None = None) -> str:
    """``step-00001000.safetensors`` or ``epoch-0003.safetensors``: names that sort in
    training order."""
    if (step is None) == (epoch is None):
        raise ValueError("snapshot_name: give exactly one of step and epoch")
    return f"step-{step:08d}.safetensors" if step is not None else f"epoch-{epoch:04d}.safetensors"


def write_weights_snapshot(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state_dict`` to ``path`` as safetensors, atomically.

    Parameters
    ----------
    state_dict : mapping of str to torch.Tensor
        The weights, on any device; copied to CPU.
    path : str or pathlib.Path
        The ``.safetensors`` file to create or replace.
    metadata : mapping of str to str, optional
        Stored in the header's ``__metadata__`` (e.g. the step and epoch).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    # clone: safetensors refuses tensors that share storage, which state dicts may hold
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state_dict.items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {})))
    return path
