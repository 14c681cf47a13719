"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from merge_core.registry import TensorInputs, merge_method
from merge_core.methods.sparsify import disjoint_mean, elect_sign


@merge_method(
    "ties",
    defaults={"lambda": 1.0, "density": 0.2, "trim_scope": "tensor"},
    trims=True,
)
def ties(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = theta_0 + lambda * tau_m, where

    tau_hat_i = trim(tau_i)  (top ``density`` fraction of |tau_i|, per tensor or per
    whole task vector as ``trim_scope`` says),
    gamma = sgn(sum_i w_i tau_hat_i),
    tau_m = sum_{i in A} w_i tau_hat_i / sum_{i in A} w_i,  A = {i : sgn(tau_hat_i) = gamma}.

    With unit weights the denominator is the paper's count |A|.
    """
    # trim each task vector as it is made, so at most one untrimmed one is alive
    trimmed = [t.trim(theta - t.base, i, p["density"]) for i, theta in enumerate(t.models)]
    sign = elect_sign(trimmed, t.weights)
    return t.base + p["lambda"] * disjoint_mean(trimmed, t.weights, sign)
