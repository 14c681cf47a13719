"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop each task vector's largest
and smallest entries, then add them by task arithmetic."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from merge_core.methods.sparsify import (
    CHUNK,
    BandRule,
    add_scaled,
    band_kept_at_cuts,
    band_mask,
    band_rule,
    fusable,
    kept_count,
    magnitude_band,
)
from merge_core.parallel import THREADS_FROM, in_threads
from merge_core.registry import TensorInputs, merge_method


@merge_method("breadcrumbs", defaults={"lambda": 1.0, "density": 0.9, "gamma": 0.01})
def breadcrumbs(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
    """theta = theta_0 + lambda * sum_i w_i tau~_i, where tau~_i = m_i * tau_i keeps the
    round(density * numel) entries of tau_i ranked just below its round(gamma * numel)
    largest |tau_i| (:func:`~merge_core.methods.sparsify.magnitude_band`).

    Parameters are mergekit's: ``gamma`` is the top fraction masked (the paper's beta),
    and the bottom fraction masked (the paper's gamma) is 1 - density - gamma. Float32/64
    tensors merge in fused numpy passes (:func:`_breadcrumbs_fused`) with the result the
    step-by-step code below gives.
    """
    if fusable(t):
        merged = _breadcrumbs_fused(t, p["density"], p["gamma"], p["lambda"])
        if merged is not None:
            return merged
    delta = torch.zeros_like(t.base)
    for w, theta in zip(t.weights.tolist(), t.models):
        delta.add_(magnitude_band(theta - t.base, p["density"], p["gamma"]), alpha=w)
    return t.base + p["lambda"] * delta


def _breadcrumbs_fused(t: TensorInputs, density: float, gamma: float, lam: float) -> torch.Tensor | None:
    """Two passes over the inputs, on threads: each expert's band
    (:func:`~merge_core.methods.sparsify.band_rule`), then every chunk masked, summed and
    scaled while it is in cache (:class:`_Merge`). Where magnitudes tie at an expert's
    cut, argpartition's choice among them runs beside the chunks, which drop every tied
    entry at first; the few entries it keeps are then merged again (as per-tensor TIES
    does). None when a task vector holds NaN or inf, whose propagation only the
    step-by-step code gives."""
    base = t.base.reshape(-1).numpy()
    models = [theta.reshape(-1).numpy() for theta in t.models]
    n = base.size
    k = kept_count(n, density)
    if k >= n:
        return None
    top = min(int(gamma * n + 0.5), n - k)
    parallel = n >= THREADS_FROM
    rules = in_threads(lambda theta: band_rule(theta, base, k, top), models, parallel)
    if any(rule is None for rule in rules):
        return None
    merge = _Merge(models, base, t.weights.tolist(), lam, np.empty(n, base.dtype))
    tied = [i for i, rule in enumerate(rules) if rule.tied]
    jobs = [functools.partial(band_kept_at_cuts, models[i], base, k, top, rules[i]) for i in tied]
    jobs += [functools.partial(merge, rules, slice(a, min(n, a + CHUNK))) for a in range(0, n, CHUNK)]
    kept = in_threads(lambda job: job(), jobs, parallel)[: len(tied)]
    if tied:
        for i, positions in zip(tied, kept):
            rules[i] = rules[i]._replace(at_cut=positions)
        merge(rules, np.unique(np.concatenate(kept)))
    return torch.from_numpy(merge.out).view(t.base.shape)


@dataclass
class _Merge:
    """Merges the entries at some positions of a tensor into ``out``: delta = sum_i w_i
    tau~_i (each a fused multiply-add, as torch's ``add_(alpha=w)``), then theta_0 +
    lambda * delta, each step rounded as the step-by-step code."""

    models: Sequence[np.ndarray]
    base: np.ndarray
    weights: list[float]
    lam: float
    out: np.ndarray

    def __call__(self, rules: Sequence[BandRule], positions: slice | np.ndarray) -> None:
        """Merge the entries at ``positions`` (a slice or sorted indices), each expert masked by its rule."""
        base = self.base[positions]
        size, dtype = base.size, base.dtype
        delta = self.out[positions] if isinstance(positions, slice) else np.empty(size, dtype)
        tau, magnitudes = np.empty(size, dtype), np.empty(size, dtype)
        keep, scratch = np.empty(size, bool), np.empty(size, bool)
        delta.fill(0)
        for theta, rule, w in zip(self.models, rules, self.weights):
            np.subtract(theta[positions], base, out=tau)
            mask = band_mask(np.abs(tau, out=magnitudes), rule, positions, keep, scratch)
            add_scaled(delta, np.multiply(tau, mask, out=tau), w)
        np.add(base, np.multiply(delta, dtype.type(self.lam), out=delta), out=delta)
        if not isinstance(positions, slice):
            self.out[positions] = delta
