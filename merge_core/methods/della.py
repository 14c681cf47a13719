"""DELLA-Merging (Deep, Bhardwaj, Majumder, Poria, 2024): drop delta entries with
magnitude-ranked probabilities (MagPrune) and rescale, then TIES sign election and
disjoint mean."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from merge_core.registry import TensorInputs, merge_method
from merge_core.methods.sparsify import della_drop, disjoint_mean, elect_sign, tensor_seed


@merge_method("della", defaults={"lambda": 1.0, "density": 0.5, "epsilon": 0.15, "seed": 0})
def della(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = theta_0 + lambda * tau_m, TIES's sign election and disjoint mean over

    tau~_i = m_i * tau_i / (1 - p_i),  m_i ~ Bernoulli(1 - p_i),

    with drop probabilities p_i ranked by |tau_i| within each row: 1 - density + epsilon
    for a row's smallest entry down to 1 - density - epsilon for its largest
    (:func:`~merge_core.methods.sparsify.magnitude_rank_keep_probabilities`). Masks are
    seeded by (seed, tensor name, i), so the result does not depend on visit order.
    """
    dropped = []
    for i, theta in enumerate(t.models):
        g = torch.Generator().manual_seed(tensor_seed(p["seed"], t.name, i))
        dropped.append(della_drop(theta - t.base, p["density"], p["epsilon"], g))
    sign = elect_sign(dropped, t.weights)
    return t.base + p["lambda"] * disjoint_mean(dropped, t.weights, sign)
