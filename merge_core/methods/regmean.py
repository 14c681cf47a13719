"""RegMean (Jin et al., 2023): each linear layer merged by the least-squares fit of the
experts' outputs on their own inputs, from the Gram files of :mod:`merge_core.grams`."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from merge_core.methods.average import average
from merge_core.registry import TensorInputs, merge_method

# the ridge of a singular system, relative to the mean of its diagonal
SINGULAR_RIDGE = 1e-6


def fraction(key: str, value: Any) -> float:
    """``alpha`` lies in [0, 1] (iso_c's ``alpha``, a scale, does not)."""
    # imported here: merge_core.recipes imports the engine, which imports this package
    from merge_core.recipes.validate import unit_interval

    return unit_interval(key, value)


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G~ = alpha G + (1 - alpha) diag(G): off-diagonal entries scaled by ``alpha``."""
    return gram * alpha + torch.diag(gram.diagonal() * (1.0 - alpha))


def solve_regression(lhs: torch.Tensor, rhs: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """X with lhs X = rhs, lhs symmetric positive semi-definite.

    By Cholesky when lhs is positive definite (the paper's and FusionBench's inverse).
    Otherwise (inputs no expert ever saw, fewer rows than inputs with ``alpha`` 1),
    (lhs + eps I) X = rhs + eps ``fallback`` with eps = 1e-6 mean(diag lhs): of the many
    minimisers, the one nearest ``fallback`` (the experts' average), where a plain
    inverse fails. A zero lhs gives ``fallback``.
    """
    factor, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    eps = SINGULAR_RIDGE * float(lhs.diagonal().mean())
    if eps <= 0:
        return fallback
    ridge = torch.eye(lhs.shape[0], dtype=lhs.dtype) * eps
    return torch.linalg.solve(lhs + ridge, rhs + eps * fallback)


@merge_method(
    "regmean",
    needs_base=False,
    base_as_member=True,
    defaults={"alpha": 0.1},
    checks={"alpha": fraction},
    needs_grams=True,
)
def regmean(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """W = ((sum_i w_i G~_i)^-1 sum_i w_i G~_i W_i^T)^T, G~_i = alpha G_i + (1 - alpha) diag(G_i),

    per linear weight W_i (out, in) (a kernel-1 Conv1d's (out, in, 1) as (out, in)), G_i
    the mean X_i^T X_i of its inputs in expert i (its Gram file): the W minimising
    sum_i w_i ||X_i W^T - X_i W_i^T||^2 / N_i with the Grams' off-diagonal entries scaled
    by ``alpha`` (1: plain RegMean; 0: each input feature weighted on its own). Solved in
    float64 (:func:`solve_regression`). Tensors without a Gram (biases, norms,
    convolutions) get the weighted average sum_i w_i theta_i / sum_i w_i.
    """
    if t.grams is None:
        return average(t, p)
    shape = t.models[0].shape
    w = (t.weights / t.weights.sum()).tolist()
    size = shape[1]
    lhs = torch.zeros(size, size, dtype=torch.float64)
    rhs = torch.zeros(size, shape[0], dtype=torch.float64)
    mean = torch.zeros(size, shape[0], dtype=torch.float64)
    for wi, theta, gram in zip(w, t.models, t.grams):
        reduced = reduce_off_diagonal(gram.to(torch.float64), p["alpha"]) * wi
        transposed = theta.to(torch.float64).reshape(shape[0], size).T
        lhs += reduced
        rhs += reduced @ transposed
        mean += transposed * wi
    return solve_regression(lhs, rhs, mean).T.reshape(shape).to(t.models[0].dtype)
