"""The plain model for export: every training-time reparametrization folded.

Experts are merged tensor by tensor against the generalist's keys, so whatever is
saved mid-training or at the end (an exported expert, a trajectory snapshot) must
hold plain weights: LoRA's ``W + (alpha/r) B A`` and L-MAM's ``lambda W_s + (1 - lambda) W_t``
baked in, under the original names.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from merge_core.attention.lmam import lmam_folded
from merge_core.training.lora import lora_folded


@contextlib.contextmanager
def plain_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` has LoRA and L-MAM folded into plain weights (its state
    dict has the original keys); on exit training resumes exactly where it was."""
    with lora_folded(model), lmam_folded(model):
        yield model
