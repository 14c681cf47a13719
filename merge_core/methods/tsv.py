"""TSV-Merge: Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, "Task
Singular Vectors: Reducing Task Interference in Model Merging" (CVPR 2025)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from merge_core.methods.subspace import (
    compose,
    concatenate,
    is_matrix,
    matrix_rank_bound,
    mean_task_vector_merge,
    names_failed_decompositions,
    polar_factor,
    rank_tolerance,
    svd,
    task_matrices,
)
from merge_core.registry import TensorInputs, merge_method


@merge_method("tsv", defaults={"alpha": 1.0}, uses_weights=False)
@names_failed_decompositions
def tsv(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = theta_0 + alpha * U_perp S V_perp^T, per matrix (conv kernels as (out, in * k)):

    tau_i = U_i S_i V_i^T, truncated to each task's top k = floor(r / T) components
    (r = min(m, n), T tasks; the paper's and FusionBench's share),
    U = [U_1 ... U_T], S = blockdiag(S_1 ... S_T), V = [V_1 ... V_T],
    U = P Sigma Q^T -> U_perp = P Q^T (= U (U^T U)^(-1/2), the paper's whitening), V_perp likewise.

    Tensors that are not matrices, and matrices of rank bound r < T (where no task
    keeps a component; FusionBench leaves them at theta_0), get theta_0 + alpha *
    mean_i tau_i. Components with a numerically zero singular value (relative to the
    largest over all tasks) are dropped before the decorrelation. Weights unused.
    """
    alpha = p["alpha"]
    k = matrix_rank_bound(t) // len(t.models) if is_matrix(t.base) else 0
    if k == 0:
        return mean_task_vector_merge(t, alpha)
    # each task's SVD is truncated as it is made, so one full decomposition is alive at a time
    kept = concatenate([svd(tau).top(k) for tau in task_matrices(t)])
    kept = kept.above(rank_tolerance(t, float(kept.s.max())))
    return compose(t, alpha, polar_factor(kept.u), kept.s, polar_factor(kept.vh))
