"""MAM's interpolation of one attention tensor (Sundar et al., Eq. 1) and Table 1's noise baselines.

W = lambda * W_s + (1 - lambda) * W_t merges a source model's attention projection W_s
(e.g. text BERT's) into a target model's W_t (e.g. a speech encoder's). The recipe that
applies it across two checkpoints is :mod:`merge_core.recipes.mam`; learned per-layer
lambdas while fine-tuning are :mod:`merge_core.attention.lmam`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from merge_core.attention.name_map import MappedTensor
from merge_core.methods.sparsify import tensor_seed

BASELINES = ("none", "noise_source", "noise_target")


def noise_like(reference: torch.Tensor, shape: torch.Size, seed: int, name: str) -> torch.Tensor:
    """Table 1's N(Source) / N(Target): Gaussian noise with ``reference``'s mean and
    variance, seeded by (seed, tensor name) so it does not depend on visit order."""
    generator = torch.Generator().manual_seed(tensor_seed(seed, name, 0))
    std, mean = torch.std_mean(reference, correction=0)
    return mean + std * torch.randn(shape, generator=generator, dtype=reference.dtype)


def interpolate(pair: MappedTensor, source: torch.Tensor, target: torch.Tensor, lam: float, p: Mapping[str, Any]) -> torch.Tensor:
    """W = lambda * W_s + (1 - lambda) * W_t (Eq. 1), W_s replaced by noise for a baseline.

    Computed in float32 (float64 when either input is); returned in the target's dtype.
    """
    dtype = torch.float64 if torch.float64 in (source.dtype, target.dtype) else torch.float32
    w_s, w_t = source.to(dtype), target.to(dtype)
    if p["baseline"] == "noise_source":
        w_s = noise_like(w_s, w_t.shape, p["seed"], pair.target)
    elif p["baseline"] == "noise_target":
        w_s = noise_like(w_t, w_t.shape, p["seed"], pair.target)
    # lerp is exact at both ends: lambda = 0 gives W_t and lambda = 1 gives W_s bit for bit
    return torch.lerp(w_t, w_s, lam).to(target.dtype)
