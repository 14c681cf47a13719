"""DARE (Yu et al., 2024): drop delta entries at random and rescale, then combine
linearly (``dare_linear``) or by TIES sign election (``dare_ties``)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from merge_core.registry import TensorInputs, merge_method
from merge_core.methods.sparsify import dare_drop, disjoint_mean, elect_sign, tensor_seed

_DEFAULTS = {"lambda": 1.0, "density": 0.5, "seed": 0}


def _dropped_task_vectors(t: TensorInputs, p: Mapping[str, Any]) -> list[torch.Tensor]:
    """tau~_i = m_i * tau_i / density with m_i ~ Bernoulli(density), seeded by
    (seed, tensor name, i) so the result does not depend on visit order."""
    dropped = []
    for i, theta in enumerate(t.models):
        g = torch.Generator().manual_seed(tensor_seed(p["seed"], t.name, i))
        dropped.append(dare_drop(theta - t.base, p["density"], g))
    return dropped


@merge_method("dare_linear", defaults=_DEFAULTS)
def dare_linear(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = theta_0 + lambda * sum_i w_i tau~_i."""
    delta = torch.zeros_like(t.base)
    for w, tau in zip(t.weights.tolist(), _dropped_task_vectors(t, p)):
        delta.add_(tau, alpha=w)
    return t.base + p["lambda"] * delta


@merge_method("dare_ties", defaults=_DEFAULTS)
def dare_ties(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = theta_0 + lambda * tau_m, with TIES's sign election and disjoint mean
    applied to the DARE-dropped tau~_i instead of magnitude-trimmed ones."""
    dropped = _dropped_task_vectors(t, p)
    sign = elect_sign(dropped, t.weights)
    return t.base + p["lambda"] * disjoint_mean(dropped, t.weights, sign)
