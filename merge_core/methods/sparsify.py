"""Masks shared by the sparsifying methods: magnitude trimming, DARE drops, sign election.

Per-tensor trimming keeps exactly k entries (``topk``), never a ``>=`` threshold,
which would keep more than k when magnitudes tie (common in bf16 deltas).
Model-wide trimming (:class:`ModelMagnitudeTrim`) finds one magnitude threshold per
task vector in a first streaming pass and again keeps exactly k entries overall.
"""

from __future__ import annotations

import hashlib
from typing import Hashable, Sequence

import numpy as np
import torch

# |x| as float32 bits shifted right by 12: 8 exponent + 11 mantissa bits, so bins
# are monotone in magnitude and 2**-11 wide relative to it.
_BIN_SHIFT = 12
_NUM_BINS = 1 << (31 - _BIN_SHIFT)


def kept_count(numel: int, density: float) -> int:
    """Entries that per-tensor trimming keeps: round(density * numel), at least one.

    The floor of one keeps a one-element tensor (a scale, a bias) from being
    silently dropped whatever the density.
    """
    return max(1, min(numel, int(density * numel + 0.5)))


def magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """trim(tau): keep the ``kept_count`` entries of largest |tau|, zero the rest.

    Exactly k entries survive, ties in magnitude included.
    """
    numel = tau.numel()
    k = kept_count(numel, density)
    if k >= numel:
        return tau
    flat = tau.reshape(-1)
    # numpy's introselect partition is ~6x faster than torch.topk on CPU, and as exact
    magnitudes = flat.abs().to(torch.float32 if flat.dtype != torch.float64 else flat.dtype).numpy()
    keep = torch.zeros(flat.shape, dtype=flat.dtype)
    keep[torch.from_numpy(np.argpartition(magnitudes, numel - k)[numel - k :])] = 1
    return (flat * keep).view(tau.shape)


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A seed that depends only on (seed, tensor name, model index), not on visit order."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: m ~ Bernoulli(density), return m * tau / density."""
    if density >= 1.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator) < density
    # a multiply, not torch.where: several times faster on CPU
    return tau * keep.to(tau.dtype) * (1.0 / density)


def elect_sign(taus: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """TIES sign election: gamma = sgn(sum_i w_i * trim(tau_i)), as +1.0 / -1.0.

    A zero sum elects +, as mergekit and PEFT do, so a tied vote is deterministic.
    """
    mass = torch.zeros_like(taus[0])
    for w, tau in zip(weights.tolist(), taus):
        mass.add_(tau, alpha=w)
    return (mass >= 0).to(mass.dtype) * 2 - 1


def disjoint_mean(taus: Sequence[torch.Tensor], weights: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TIES disjoint merge: sum_{i in A} w_i tau_i / sum_{i in A} w_i, A = experts whose
    non-zero entry has the elected ``sign``; 0 where A is empty."""
    num = torch.zeros_like(taus[0])
    den = torch.zeros_like(taus[0])
    for w, tau in zip(weights.tolist(), taus):
        # |tau_i| where tau_i has the elected sign, else 0: in-place passes, no masks
        agreeing = (tau * sign).clamp_min_(0)
        num.add_(agreeing, alpha=w)
        den.add_(agreeing.sign_(), alpha=w)
    # num is 0 wherever den is: dividing by a tiny floor there yields the 0 we want
    return sign * num / den.clamp_min(torch.finfo(den.dtype).tiny)


def _magnitude_bins(tau: torch.Tensor) -> torch.Tensor:
    return tau.detach().abs().to(torch.float32).view(torch.int32).reshape(-1) >> _BIN_SHIFT


class _Threshold:
    """Where one task vector is cut: bins above ``cut`` are kept, and ``quota`` of the
    ``boundary`` entries inside bin ``cut``, handed out tensor by tensor."""

    def __init__(self, counts: torch.Tensor, density: float) -> None:
        total = int(counts.sum())
        k = int(density * total + 0.5)
        if k >= total:
            self.cut, self.quota, self.boundary = -1, 0, 0
            return
        from_top = counts.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, torch.tensor(max(k, 1))))
        self.cut = _NUM_BINS - 1 - j
        in_cut = int(counts[self.cut])
        self.quota = k - (int(from_top[j]) - in_cut)
        self.boundary = in_cut

    def apply(self, tau: torch.Tensor) -> torch.Tensor:
        bins = _magnitude_bins(tau)
        keep = bins > self.cut
        at_cut = (bins == self.cut).nonzero().squeeze(1)
        m = at_cut.numel()
        if m and self.boundary:
            # largest-remainder share of the boundary quota; the last tensor that
            # holds boundary entries takes exactly what is left
            q = min(m, (2 * self.quota * m + self.boundary) // (2 * self.boundary))
            self.quota -= q
            self.boundary -= m
            if q:
                magnitudes = tau.reshape(-1)[at_cut].abs()
                keep[at_cut[magnitudes.topk(q, sorted=False).indices]] = True
        return (tau.reshape(-1) * keep.to(tau.dtype)).view(tau.shape)


class ModelMagnitudeTrim:
    """Trimming over a whole task vector (the TIES and sequential-editing papers' scope),
    in streaming form.

    Pass 1 (:meth:`observe`) builds a magnitude histogram of each task vector;
    :meth:`finalize` finds the bin holding the k-th largest magnitude; pass 2
    (:meth:`apply`) keeps every entry above that bin and shares the remaining quota
    among the bin's entries by magnitude, so exactly round(density * N) entries of the
    N in the task vector survive. Pass 2 must visit tensors in pass 1's order for the
    choice to be deterministic.
    """

    def __init__(self) -> None:
        self._counts: dict[Hashable, torch.Tensor] = {}
        self._density: dict[Hashable, float] = {}
        self._cuts: dict[Hashable, _Threshold] | None = None

    def observe(self, key: Hashable, tau: torch.Tensor, density: float) -> None:
        if key not in self._counts:
            self._counts[key] = torch.zeros(_NUM_BINS, dtype=torch.int64)
            self._density[key] = density
        bins = _magnitude_bins(tau)
        # index_add_ costs O(numel); bincount(minlength=...) also pays for every bin
        self._counts[key].index_add_(0, bins, torch.ones(1, dtype=torch.int64).expand(bins.numel()))

    def finalize(self) -> None:
        self._cuts = {key: _Threshold(c, self._density[key]) for key, c in self._counts.items()}
        self._counts.clear()

    def apply(self, key: Hashable, tau: torch.Tensor) -> torch.Tensor:
        if self._cuts is None:
            raise RuntimeError("ModelMagnitudeTrim.apply before finalize")
        return self._cuts[key].apply(tau)
