"""DELLA-Merging (Deep, Bhardwaj, Majumder, Poria, 2024): drop delta entries with
magnitude-ranked probabilities (MagPrune) and rescale, then TIES sign election and
disjoint mean."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from merge_core.methods.sparsify import (
    CHUNK,
    by_row_rank,
    della_drop,
    disjoint_mean,
    elect_sign,
    fusable,
    row_view,
    tensor_seed,
)
from merge_core.parallel import THREADS_FROM, in_threads
from merge_core.registry import TensorInputs, merge_method


@merge_method("della", defaults={"lambda": 1.0, "density": 0.5, "epsilon": 0.15, "seed": 0})
def della(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = theta_0 + lambda * tau_m, TIES's sign election and disjoint mean over

    tau~_i = m_i * tau_i / (1 - p_i),  m_i ~ Bernoulli(1 - p_i),

    with drop probabilities p_i ranked by |tau_i| within each row: 1 - density + epsilon
    for a row's smallest entry down to 1 - density - epsilon for its largest
    (:func:`~merge_core.methods.sparsify.magnitude_rank_keep_probabilities`). Masks are
    seeded by (seed, tensor name, i), so the result does not depend on visit order.
    Float32 tensors drop in numpy on threads (:func:`_della_drops`), with the masks and
    values the step-by-step code below gives.
    """
    dropped = _della_drops(t, p) if fusable(t) and t.base.dtype == torch.float32 else None
    if dropped is None:
        dropped = []
        for i, theta in enumerate(t.models):
            g = torch.Generator().manual_seed(tensor_seed(p["seed"], t.name, i))
            dropped.append(della_drop(theta - t.base, p["density"], p["epsilon"], g))
    sign = elect_sign(dropped, t.weights)
    return t.base + p["lambda"] * disjoint_mean(dropped, t.weights, sign)


def _della_drops(t: TensorInputs, p: Mapping[str, Any]) -> list[torch.Tensor] | None:
    """Each expert's tau~_i, one expert per thread: the keep probability of each rank
    computed once per tensor and placed by :func:`~merge_core.methods.sparsify.by_row_rank`.
    None where the step-by-step code takes another path (density 1, epsilon 0, one entry
    per row) or a |tau| is NaN."""
    density, epsilon = p["density"], p["epsilon"]
    shape = row_view(t.base).shape
    n = shape[1]
    if density >= 1.0 or epsilon == 0 or n < 2 or t.base.numel() == 0:
        return None
    # k_r = density - epsilon + r * 2 epsilon / (n - 1), rounded as torch's float32 scalar ops
    keep_by_rank = np.arange(n, dtype=np.float32)
    np.multiply(keep_by_rank, np.float32(2 * epsilon / (n - 1)), out=keep_by_rank)
    np.add(keep_by_rank, np.float32(density - epsilon), out=keep_by_rank)
    base = t.base.reshape(shape).numpy()
    block = max(1, CHUNK // n)

    def drop(i: int) -> torch.Tensor | None:
        tau = np.subtract(t.models[i].reshape(shape).numpy(), base)
        g = torch.Generator().manual_seed(tensor_seed(p["seed"], t.name, i))
        uniform = torch.rand(t.base.shape, generator=g).numpy().reshape(shape)
        for start in range(0, shape[0], block):  # blocks of rows bound the sort keys' memory
            rows = slice(start, start + block)
            keep = by_row_rank(np.abs(tau[rows]), keep_by_rank)
            if keep is None:
                return None
            dropped = np.multiply(tau[rows], np.less(uniform[rows], keep), out=tau[rows])
            np.divide(dropped, keep, out=dropped)
        return torch.from_numpy(tau).view(t.base.shape)

    dropped = in_threads(drop, range(len(t.models)), t.base.numel() >= THREADS_FROM)
    return None if any(d is None for d in dropped) else dropped
