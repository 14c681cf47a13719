"""Model Stock (Jang, Yun, Han, ECCV 2024): move from the base towards the experts'
average by a ratio set by the angle between their task vectors."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from merge_core.registry import TensorInputs, merge_method
from merge_core.methods.sparsify import row_view


def mean_pairwise_cosine(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """cos(theta) = mean_{i<j} <tau_i, tau_j> / (|tau_i| |tau_j|) per row of the (rows, n)
    ``taus``, accumulated in float64; a zero task vector counts as orthogonal (cos 0)."""
    norms = [tau.square().sum(-1, dtype=torch.float64).sqrt() for tau in taus]
    total = torch.zeros_like(norms[0])
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            dot = (taus[i] * taus[j]).sum(-1, dtype=torch.float64)
            scale = norms[i] * norms[j]
            total += torch.where(scale > 0, dot / scale.clamp_min(torch.finfo(scale.dtype).tiny), 0.0).clamp(-1, 1)
    return total / (len(taus) * (len(taus) - 1) / 2)


@merge_method("model_stock", min_models=2, defaults={"filter_wise": False}, uses_weights=False)
def model_stock(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = t theta_avg + (1 - t) theta_0 = theta_0 + t mean_i tau_i, where

    t = k cos(theta) / (1 + (k - 1) cos(theta)),  k experts,

    cos(theta) from :func:`mean_pairwise_cosine` over the whole tensor (the paper's
    per-layer angle), or per output row with ``filter_wise``, clamped to [0, 1] so t
    stays in [0, 1] (the paper's geometry assumes a non-negative cosine). Weights unused.
    """
    rows = row_view if p["filter_wise"] else (lambda x: x.reshape(1, -1))
    taus = [rows(theta - t.base) for theta in t.models]
    cos = mean_pairwise_cosine(taus).clamp(0, 1).unsqueeze(-1)
    k = len(taus)
    ratio = (k * cos / (1 + (k - 1) * cos)).to(t.base.dtype)
    mean_tau = taus[0].clone()
    for tau in taus[1:]:
        mean_tau.add_(tau)
    mean_tau /= k
    return t.base + (ratio * mean_tau).view(t.base.shape)
