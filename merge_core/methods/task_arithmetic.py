"""Task arithmetic (Ilharco et al.), also sequential model editing's update step."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from merge_core.registry import TensorInputs, merge_method


@merge_method("task_arithmetic", defaults={"lambda": 1.0})
def task_arithmetic(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = theta_0 + lambda * sum_i w_i tau_i, with tau_i = theta_i - theta_0."""
    delta = torch.zeros_like(t.base)
    for w, theta in zip(t.weights.tolist(), t.models):
        delta.add_(theta - t.base, alpha=w)
    return t.base + p["lambda"] * delta
