"""Spherical linear interpolation between exactly two models."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from merge_core.registry import TensorInputs, merge_method

# Below this angle sin(Omega) is too small to divide by; lerp is exact enough there.
_COLINEAR_EPS = 1e-6


@merge_method("slerp", needs_base=False, min_models=2, max_models=2, defaults={"t": 0.5}, uses_weights=False)
def slerp(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = sin((1-t) Omega) / sin(Omega) * theta_1 + sin(t Omega) / sin(Omega) * theta_2,

    Omega = arccos(<theta_1, theta_2> / (|theta_1| |theta_2|)) over the flattened tensor
    (computed in float64); linear interpolation when the two are (anti)parallel
    within 1e-6 or one is zero.
    """
    a, b = t.models
    frac = float(p["t"])
    na, nb = a.double().norm(), b.double().norm()
    if na == 0 or nb == 0:
        return torch.lerp(a, b, frac)
    cos = float((a.double().reshape(-1) @ b.double().reshape(-1)) / (na * nb))
    cos = max(-1.0, min(1.0, cos))
    omega = math.acos(cos)
    if math.sin(omega) < _COLINEAR_EPS:
        return torch.lerp(a, b, frac)
    s = math.sin(omega)
    return a * (math.sin((1 - frac) * omega) / s) + b * (math.sin(frac * omega) / s)
