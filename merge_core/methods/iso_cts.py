"""Iso-CTS: Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left
Behind: Isotropic Model Merging with Common and Task-Specific Subspaces" (ICML 2025)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from merge_core.methods.subspace import (
    Components,
    compose,
    concatenate,
    flat_spectrum,
    is_matrix,
    matrix_rank_bound,
    mean_task_vector_merge,
    names_failed_decompositions,
    polar_factor,
    rank_tolerance,
    summed_task_matrix,
    svd,
    task_matrices,
)
from merge_core.registry import TensorInputs, merge_method


def subspace_sizes(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(k, s): k common components and s per task, k + T s = r.

    FusionBench's allocation: s = round((r - floor(r * common_fraction)) / T), so
    the task-specific total divides by T, capped at floor(r / T) so k is not negative
    on tiny matrices; k = r - T s.
    """
    per_task = min(rank // tasks, round((rank - int(rank * common_fraction)) / tasks))
    return rank - tasks * per_task, per_task


@merge_method("iso_cts", defaults={"alpha": 1.0, "common_fraction": 0.8}, uses_weights=False)
@names_failed_decompositions
def iso_cts(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = theta_0 + alpha * sigma_bar U_perp V_perp^T, per matrix (conv kernels as (out, in * k)):

    Delta = sum_i tau_i = U S V^T; common subspace: its top k components U_c, S_c, V_c;
    task-specific: each tau_i off the common left subspace,
    tau_i - U_c U_c^T tau_i = U_i S_i V_i^T, its top s components;
    k = r - T s, s = round((r - floor(common_fraction * r)) / T) (:func:`subspace_sizes`),
    U = [U_c U_1 ... U_T] = P Sigma Q^T -> U_perp = P Q^T, V_perp likewise,
    sigma_bar = the mean of [S_c S_1 ... S_T].

    ``common_fraction: 1`` is Iso-C. Components with a numerically zero singular value
    (relative to Delta's largest, or the residual's when larger) are left out of the
    basis and of the mean. Tensors that are not matrices get theta_0 + alpha *
    mean_i tau_i, as in FusionBench. Weights unused.
    """
    alpha = p["alpha"]
    if not is_matrix(t.base):
        return mean_task_vector_merge(t, alpha)
    k, s = subspace_sizes(matrix_rank_bound(t), len(t.models), p["common_fraction"])
    delta = svd(summed_task_matrix(t))
    largest = delta.largest
    common = delta.top(k).above(rank_tolerance(t, largest))
    del delta  # only the top k are kept: free the full decomposition before the task loop
    kept = concatenate([common, *task_subspaces(t, common.u, s, largest)])
    return compose(t, alpha, polar_factor(kept.u), flat_spectrum(kept.s), polar_factor(kept.vh))


def task_subspaces(t: TensorInputs, common: torch.Tensor, s: int, largest: float) -> list[Components]:
    """Each tau_i - U_c U_c^T tau_i truncated to its top s components, numerical zeros
    (relative to Delta's sigma_max ``largest`` or the residual's, if larger) left out."""
    if s == 0:
        return []
    parts = []
    for tau in task_matrices(t):
        residual = svd(tau.sub_(common @ (common.T @ tau)))  # tau is a fresh difference: subtract in place
        parts.append(residual.top(s).above(rank_tolerance(t, max(largest, residual.largest))))
    return parts
