"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from merge_core.methods.sparsify import (
    CHUNK,
    TrimRule,
    add_scaled,
    apply_rule,
    disjoint_mean,
    elect_sign,
    fusable,
    kept_at_cut,
    kept_count,
    trim_cut,
)
from merge_core.parallel import THREADS_FROM, in_threads
from merge_core.registry import TensorInputs, merge_method


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

    With unit weights the denominator is the paper's count |A|. Per-tensor trimming of
    float32/float64 tensors runs fused (:func:`_ties_per_tensor`), with the result the
    step-by-step code below gives; ``t.trim`` serves the whole-task-vector scope.
    """
    if p["trim_scope"] == "tensor" and fusable(t):
        merged = _ties_per_tensor(t, p["density"], p["lambda"])
        if merged is not None:
            return merged
    # trim each task vector as it is made, so at most one untrimmed one is alive
    trimmed = [t.trim(theta - t.base, i, p["density"]) for i, theta in enumerate(t.models)]
    sign = elect_sign(trimmed, t.weights)
    return t.base + p["lambda"] * disjoint_mean(trimmed, t.weights, sign)


def _ties_per_tensor(t: TensorInputs, density: float, lam: float) -> torch.Tensor | None:
    """TIES with per-tensor trimming in two passes over the inputs, both on threads in numpy:
    each expert's cut (:func:`~merge_core.methods.sparsify.trim_cut`), then every chunk of
    entries trimmed, voted and merged while it is in cache (:class:`_Merge`). Where
    magnitudes tie at an expert's cut, argpartition's choice among them
    (:func:`~merge_core.methods.sparsify.kept_at_cut`) runs beside the chunks, which drop
    every tied entry at first; the few entries it keeps are then merged again. Bit for bit
    the step-by-step result; None when a task vector holds NaN or inf, whose propagation
    through the steps only torch reproduces."""
    base = t.base.reshape(-1).numpy()
    models = [theta.reshape(-1).numpy() for theta in t.models]
    n = base.size
    k = kept_count(n, density)
    parallel = n >= THREADS_FROM
    cuts = in_threads(lambda theta: trim_cut(theta, base, k), models, parallel)
    if any(cut is None for cut in cuts):
        return None
    merge = _Merge(models, base, t.weights.tolist(), lam, np.empty(n, base.dtype))
    tied = [i for i, cut in enumerate(cuts) if cut.tied]
    rules = [TrimRule(cut.cut, _NO_POSITIONS if cut.tied else None) for cut in cuts]
    jobs = [functools.partial(kept_at_cut, models[i], base, k, cuts[i].cut) for i in tied]
    jobs += [functools.partial(merge, rules, slice(a, min(n, a + CHUNK))) for a in range(0, n, CHUNK)]
    kept = in_threads(lambda job: job(), jobs, parallel)[: len(tied)]
    if tied:
        for i, positions in zip(tied, kept):
            rules[i] = TrimRule(cuts[i].cut, positions)
        merge(rules, np.unique(np.concatenate(kept)))
    return torch.from_numpy(merge.out).view(t.base.shape)


_NO_POSITIONS = np.empty(0, dtype=np.intp)


@dataclass
class _Merge:
    """Merges the entries at some positions of a tensor into ``out``: the step-by-step
    code's arithmetic, each step rounded as there.

    mass = sum_i w_i tau_i (each a fused multiply-add, as torch's ``add_(alpha=w)``);
    gamma = +1 where mass >= 0, else -1; num = sum_i w_i max(gamma tau_i, 0) and den = sum
    of w_i over the experts with gamma tau_i > 0, both in expert order; out = theta_0 +
    lambda * gamma * num / max(den, tiny). Zeros may come out as -0 where the steps give
    +0 (a product with a 0/1 mask): adding or dividing them changes nothing, and num
    starts at +0, so the result is the same. With unit weights den is a count, summed in
    uint8 and floored at 1 instead of tiny (num is 0 exactly where the count is).
    """

    models: Sequence[np.ndarray]
    base: np.ndarray
    weights: list[float]
    lam: float
    out: np.ndarray
    _counted: bool = field(init=False)

    def __post_init__(self) -> None:
        self._counted = all(w == 1.0 for w in self.weights) and len(self.weights) < 256

    def __call__(self, rules: Sequence[TrimRule], positions: slice | np.ndarray) -> None:
        """Merge the entries at ``positions`` (a slice or sorted indices), each expert trimmed by its rule."""
        base = self.base[positions]
        size, dtype = base.size, base.dtype
        num = self.out[positions] if isinstance(positions, slice) else np.empty(size, dtype)
        floats = [np.empty(size, dtype) for _ in range(len(self.models) + 3)]
        taus, (mass, sign, den) = floats[:-3], floats[-3:]
        keep, agrees, count = np.empty(size, bool), np.empty(size, bool), np.zeros(size, np.uint8)
        with np.errstate(invalid="ignore", over="ignore"):  # overflow to inf: as torch, silently
            for theta, rule, tau in zip(self.models, rules, taus):
                apply_rule(theta[positions], base, rule, positions, tau, (mass, keep))
            mass.fill(0)
            for w, tau in zip(self.weights, taus):
                add_scaled(mass, tau, w)
            # gamma = 2 [mass >= 0] - 1, in int8 and then cast
            elected = np.greater_equal(mass, 0, out=agrees).view(np.int8)
            np.copyto(sign, np.subtract(np.multiply(elected, 2, out=elected), 1, out=elected))
            num.fill(0)
            den.fill(0)
            agreeing = mass
            for w, tau in zip(self.weights, taus):
                np.multiply(tau, sign, out=agreeing)
                np.greater(agreeing, 0, out=agrees)
                add_scaled(num, np.multiply(agreeing, agrees, out=agreeing), w)
                if self._counted:
                    np.add(count, agrees.view(np.uint8), out=count)
                else:  # w * 1 is exact: this is the fused add of w * sgn(agreeing); tau is spent
                    np.add(den, np.multiply(agrees, dtype.type(w), out=tau), out=den)
            if self._counted:
                np.copyto(den, np.maximum(count, 1, out=count))
            else:
                np.maximum(den, np.finfo(dtype).tiny, out=den)
            np.divide(np.multiply(num, sign, out=num), den, out=num)
            if self.lam != 1.0:  # x * 1 is x
                np.multiply(num, dtype.type(self.lam), out=num)
            np.add(base, num, out=num)
        if not isinstance(positions, slice):
            self.out[positions] = num
