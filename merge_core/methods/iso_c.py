"""Iso-C: Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left
Behind: Isotropic Model Merging with Common and Task-Specific Subspaces" (ICML 2025)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from merge_core.methods.subspace import (
    compose,
    flat_spectrum,
    is_matrix,
    mean_task_vector_merge,
    names_failed_decompositions,
    rank_tolerance,
    summed_task_matrix,
    svd,
)
from merge_core.registry import TensorInputs, merge_method


@merge_method("iso_c", defaults={"alpha": 1.0}, uses_weights=False)
@names_failed_decompositions
def iso_c(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = theta_0 + alpha * sigma_bar U V^T, per matrix (conv kernels as (out, in * k)):

    Delta = sum_i tau_i = U S V^T,  sigma_bar = mean_j s_j,

    the spectrum of the task-arithmetic sum flattened to its mean. The mean and U, V
    run over the components of non-zero singular value: all min(m, n) of a full-rank
    Delta, as in the paper; numerical zeros, whose singular vectors are arbitrary, are
    left out. Tensors that are not matrices get theta_0 + alpha * mean_i tau_i, as in
    FusionBench. Weights unused.
    """
    alpha = p["alpha"]
    if not is_matrix(t.base):
        return mean_task_vector_merge(t, alpha)
    delta = svd(summed_task_matrix(t))
    delta = delta.above(rank_tolerance(t, delta.largest))
    return compose(t, alpha, delta.u, flat_spectrum(delta.s), delta.vh)
