"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop each task vector's largest
and smallest entries, then add them by task arithmetic."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from merge_core.registry import TensorInputs, merge_method
from merge_core.methods.sparsify import magnitude_band


@merge_method("breadcrumbs", defaults={"lambda": 1.0, "density": 0.9, "gamma": 0.01})
def breadcrumbs(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = theta_0 + lambda * sum_i w_i tau~_i, where tau~_i = m_i * tau_i keeps the
    round(density * numel) entries of tau_i ranked just below its round(gamma * numel)
    largest |tau_i| (:func:`~merge_core.methods.sparsify.magnitude_band`).

    Parameters are mergekit's: ``gamma`` is the top fraction masked (the paper's beta),
    and the bottom fraction masked (the paper's gamma) is 1 - density - gamma.
    """
    delta = torch.zeros_like(t.base)
    for w, theta in zip(t.weights.tolist(), t.models):
        delta.add_(magnitude_band(theta - t.base, p["density"], p["gamma"]), alpha=w)
    return t.base + p["lambda"] * delta
