"""Weighted parameter averaging: AoDE, model soups, MAcT."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from merge_core.registry import TensorInputs, merge_method


@merge_method("average", needs_base=False, base_as_member=True)
def average(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = sum_i w_i theta_i / sum_i w_i.

    With ``include_base`` the base joins the members with its own weight (the
    paper's "AoDE with orig" and "original x4" rows). Equal weights by default.
    """
    coeffs = (t.weights / t.weights.sum()).tolist()
    merged = torch.zeros_like(t.models[0])
    for c, theta in zip(coeffs, t.models):
        merged.add_(theta, alpha=c)
    return merged
