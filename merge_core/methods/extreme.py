"""Per-entry extreme-value aggregation: the comparison of Table IV in
Plantinga et al., "Parameter Averaging Is All You Need to Prevent Forgetting"."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from merge_core.registry import TensorInputs, merge_method


@merge_method("extreme", needs_base=False, base_as_member=True, defaults={"mode": "max"}, uses_weights=False)
def extreme(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta[j] = theta_{i*}[j] with i* = argmax_i |theta_i[j]| (``mode: max``) or
    argmin_i |theta_i[j]| (``mode: min``); the first model wins a tie. Weights unused."""
    pick = torch.gt if p["mode"] == "max" else torch.lt
    merged = t.models[0].clone()
    for theta in t.models[1:]:
        take = pick(theta.abs(), merged.abs())
        merged = torch.where(take, theta, merged)
    return merged
