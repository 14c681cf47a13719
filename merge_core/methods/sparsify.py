"""Masks shared by the sparsifying methods: magnitude trimming, DARE drops, sign election.

Per-tensor trimming keeps exactly k entries (those ``numpy.argpartition`` puts last),
never a ``>=`` threshold, which would keep more than k when magnitudes tie (common in
bf16 deltas). Model-wide trimming (:class:`ModelMagnitudeTrim`) finds one magnitude
threshold per task vector in a first streaming pass and again keeps exactly k entries
overall.

Speed: per-tensor trimming finds the k-th largest magnitude in numpy
(:mod:`merge_core.parallel`), in chunks that stay in the CPU's cache (:func:`trim_rule`);
sign election compares in numpy too.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import TYPE_CHECKING, Hashable, NamedTuple, Sequence

import numpy as np
import torch

from merge_core.parallel import numpy_ready

if TYPE_CHECKING:
    from merge_core.registry import TensorInputs

# entries per chunk of the chunked passes: the arrays of a chunk stay in the CPU's cache,
# and each numpy call is long enough (tens of microseconds) that threads rarely wait for
# the GIL
CHUNK = 1 << 17
# trim_rule brackets the k-th largest magnitude with a random sample of up to _SAMPLE
# entries (1/16 of the tensor) from _BRACKET_FROM entries on; smaller tensors are
# partitioned whole
_SAMPLE = 16384
_BRACKET_FROM = 4096

# torch runs an op on fewer entries than its intra-op grain (32768) on the calling thread
_TORCH_PIECE = 1 << 14

# |x| as float32 bits shifted right by 12: 8 exponent + 11 mantissa bits, so bins
# are monotone in magnitude and 2**-11 wide relative to it.
_BIN_SHIFT = 12
_NUM_BINS = 1 << (31 - _BIN_SHIFT)
# float32 +inf as bits: larger bit patterns of a magnitude are NaN
_INF_BITS = 0x7F800000


def kept_count(numel: int, density: float) -> int:
    """Entries that per-tensor trimming keeps: round(density * numel), at least one.

    The floor of one keeps a one-element tensor (a scale, a bias) from being
    silently dropped whatever the density.
    """
    return max(1, min(numel, int(density * numel + 0.5)))


def magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """trim(tau): keep the ``kept_count`` entries of largest |tau|, zero the rest.

    Exactly k entries survive, ties in magnitude included: the ones
    ``numpy.argpartition`` keeps (:func:`trim_rule`).
    """
    numel = tau.numel()
    k = kept_count(numel, density)
    if k >= numel:
        return tau
    flat = tau.reshape(-1)
    everything = slice(0, numel)
    if numpy_ready(flat):
        values = flat.numpy()
        return torch.from_numpy(apply_rule(values, None, trim_rule(values, None, k), everything)).view(tau.shape)
    magnitudes = flat.abs().to(torch.float32).numpy()
    keep = rule_mask(magnitudes, trim_rule(magnitudes, None, k), everything)
    return (flat * torch.from_numpy(keep)).view(tau.shape)


class TrimCut(NamedTuple):
    """The k-th largest |tau| (``cut``), and whether an entry ranked below it has the same
    magnitude (``tied``: then which of the entries at the cut are kept is argpartition's
    choice, :func:`kept_at_cut`)."""

    cut: np.floating
    tied: bool


class TrimRule(NamedTuple):
    """Which entries per-tensor trimming keeps. With a ``cut``: those with |tau| > cut,
    and of those with |tau| == cut the ones at the positions ``at_cut`` (all of them when
    None). Without (a NaN or inf |tau|): those of ``mask``."""

    cut: np.floating | None
    at_cut: np.ndarray | None = None
    mask: np.ndarray | None = None


def trim_rule(theta: np.ndarray, base: np.ndarray | None, k: int) -> TrimRule:
    """Which k of the n entries of tau = theta - base (theta itself when ``base`` is None;
    1-D arrays) have the largest |tau|: the k that ``numpy.argpartition(|tau|, n - k)``
    puts last, NaN counted largest (:func:`trim_cut`, then :func:`kept_at_cut` when
    magnitudes tie at the cut)."""
    found = trim_cut(theta, base, k)
    if found is None:
        with np.errstate(invalid="ignore", over="ignore"):
            return TrimRule(None, mask=_argpartition_mask(_magnitudes(theta, base), k))
    return TrimRule(found.cut, kept_at_cut(theta, base, k, found.cut) if found.tied else None)


def trim_cut(theta: np.ndarray, base: np.ndarray | None, k: int) -> TrimCut | None:
    """The k-th largest |tau| for tau = theta - base (theta itself when ``base`` is None;
    1-D arrays), and whether it ties; None when a |tau| is NaN or inf.

    Found without holding |tau| whole: a random sample brackets the cut, one chunked pass
    counts the magnitudes above the bracket and gathers those inside it, and a partition
    of the few inside finds the cut (:func:`_bracket`).
    """
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, overflow: as torch, silently
        if theta.size >= _BRACKET_FROM:
            inside, above, top = _bracket(theta, base, k)
            if not np.isfinite(top):
                return None
            rank = k - above  # of the cut, from the top, among the entries inside the bracket
            if 0 < rank <= inside.size:
                return _rank_cut(inside, rank)
        # a small array or a missed bracket (about once in 30,000): the whole array
        magnitudes = _magnitudes(theta, base)
        if not np.isfinite(magnitudes.max()):
            return None
        return _rank_cut(magnitudes, k)


def kept_at_cut(theta: np.ndarray, base: np.ndarray | None, k: int, cut: np.floating) -> np.ndarray:
    """The positions (sorted) of the entries with |tau| == ``cut`` that
    ``numpy.argpartition(|tau|, n - k)`` puts among the last k. Which tied entries it
    keeps depends on its partitioning order over the whole array, so it runs on |tau|
    whole: trimming keeps the entries it always kept."""
    with np.errstate(invalid="ignore", over="ignore"):
        magnitudes = _magnitudes(theta, base)
    n = magnitudes.size
    top = np.argpartition(magnitudes, n - k)[n - k :]
    return np.sort(top[magnitudes[top] == cut])


def _magnitudes(theta: np.ndarray, base: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
    """|theta - base| (|theta| when ``base`` is None), into ``out`` when given."""
    if base is None:
        return np.abs(theta, out=out)
    diff = np.subtract(theta, base, out=out)
    return np.abs(diff, out=diff)


def _rank_cut(values: np.ndarray, rank: int) -> TrimCut:
    """The rank-th largest of ``values`` (none NaN), and whether a value ranked below it equals it."""
    split = values.size - rank
    part = np.partition(values, split)
    cut = part[split]
    return TrimCut(cut, bool(split) and bool(part[:split].max() == cut))


def _argpartition_mask(magnitudes: np.ndarray, k: int) -> np.ndarray:
    n = magnitudes.size
    keep = np.zeros(n, dtype=bool)
    keep[np.argpartition(magnitudes, n - k)[n - k :]] = True
    return keep


def _bracket(theta: np.ndarray, base: np.ndarray | None, k: int) -> tuple[np.ndarray, int, np.floating]:
    """The magnitudes inside a bracket around the k-th largest, how many lie above it, and
    the largest magnitude (NaN if any is NaN), in one chunked pass.

    The bracket spans the sample quantiles 4 standard deviations (of a sample quantile)
    either side of the cut's quantile q = 1 - k / n, so it misses the cut about once in
    30,000 calls; it is unbounded on a side where it would pass the sample's end. NaN
    magnitudes fall inside it.
    """
    n = theta.size
    lo, hi = _sample_bracket(theta, base, k)
    width = min(n, CHUNK)
    magnitudes, above, outside = np.empty(width, theta.dtype), np.empty(width, bool), np.empty(width, bool)
    n_above, top, inside = 0, np.zeros((), theta.dtype), []
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        size = stop - start
        m = _magnitudes(theta[start:stop], None if base is None else base[start:stop], magnitudes[:size])
        top = np.maximum(top, m.max())
        n_above += int(np.count_nonzero(np.greater(m, hi, out=above[:size])))
        out = np.logical_or(np.less(m, lo, out=outside[:size]), above[:size], out=outside[:size])
        inside.append(np.compress(np.logical_not(out, out=out), m))
    return np.concatenate(inside), n_above, top


def _sample_bracket(theta: np.ndarray, base: np.ndarray | None, k: int) -> tuple[float, float]:
    n = theta.size
    positions = _sample_positions(n)
    sample = np.abs(theta.take(positions) if base is None else theta.take(positions) - base.take(positions))
    last = sample.size - 1
    q = 1 - k / n
    spread = 4 * math.sqrt(sample.size * q * (1 - q)) + 8
    low, high = int(q * last - spread), int(q * last + spread) + 1
    sample.partition([min(max(r, 0), last) for r in (low, high)])
    return (sample[low] if low > 0 else -np.inf), (sample[high] if high < last else np.inf)


@functools.lru_cache(maxsize=64)
def _sample_positions(n: int) -> np.ndarray:
    """Fixed pseudo-random positions (repeats allowed) in an array of n entries: unlike
    a stride, unbiased whatever the tensor's layout (rows, channels)."""
    positions = np.random.default_rng(n).integers(0, n, size=min(_SAMPLE, n // 16))
    positions.setflags(write=False)
    return positions


def rule_mask(
    magnitudes: np.ndarray, rule: TrimRule, positions: slice | np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """The entries ``rule`` keeps among ``magnitudes``, the |tau| of the entries at
    ``positions`` (a slice or sorted indices), as a boolean mask (into ``out`` when given)."""
    if rule.cut is None:
        return rule.mask[positions]
    if rule.at_cut is None:
        return np.greater_equal(magnitudes, rule.cut, out=out)
    return mark_positions(np.greater(magnitudes, rule.cut, out=out), rule.at_cut, positions)


def mark_positions(keep: np.ndarray, marked: np.ndarray, positions: slice | np.ndarray) -> np.ndarray:
    """``keep`` (a mask of the entries at ``positions``: a slice or sorted indices) with
    the entries at the sorted positions ``marked`` set."""
    if isinstance(positions, slice):
        lo, hi = np.searchsorted(marked, [positions.start, positions.stop])
        keep[marked[lo:hi] - positions.start] = True
    else:
        keep |= np.isin(positions, marked, assume_unique=True)
    return keep


def apply_rule(
    theta: np.ndarray, base: np.ndarray | None, rule: TrimRule, positions: slice | np.ndarray,
    out: np.ndarray | None = None, scratch: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """trim(tau) = tau * keep for tau = theta - base (theta when ``base`` is None), the
    entries at ``positions`` of the task vector (a slice or sorted indices): kept entries
    unchanged, dropped ones +-0 (NaN for an inf), as a multiply by a 0/1 mask gives.
    ``scratch``: a float and a bool array at least as long as ``theta``."""
    size = theta.size
    out = np.empty(size, theta.dtype) if out is None else out
    floats, bools = scratch if scratch is not None else (np.empty(size, theta.dtype), np.empty(size, bool))
    with np.errstate(invalid="ignore", over="ignore"):
        tau = theta if base is None else np.subtract(theta, base, out=out)
        magnitudes = None if rule.cut is None else np.abs(tau, out=floats[:size])
        return np.multiply(tau, rule_mask(magnitudes, rule, positions, bools[:size]), out=out)


def fusable(t: TensorInputs) -> bool:
    """Whether the fused numpy passes can merge ``t``: base and experts float32/float64 CPU
    tensors of one dtype and shape."""
    tensors = [t.base, *t.models]
    return all(numpy_ready(x) and x.dtype == t.base.dtype and x.shape == t.base.shape for x in tensors)


def add_scaled(acc: np.ndarray, x: np.ndarray, w: float) -> None:
    """acc += w * x rounded as torch's ``add_(x, alpha=w)``: one fused multiply-add, which
    for w = 1 is a plain add. torch runs on pieces below its intra-op grain, so that it
    starts no threads of its own inside ours."""
    if w == 1.0:
        np.add(acc, x, out=acc)
        return
    for start in range(0, acc.size, _TORCH_PIECE):
        piece = slice(start, start + _TORCH_PIECE)
        torch.from_numpy(acc[piece]).add_(torch.from_numpy(x[piece]), alpha=w)



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
    if numpy_ready(mass):  # numpy's compare and cast: ~6x faster than torch's
        elected = torch.from_numpy((mass.numpy() >= 0).astype(mass.numpy().dtype))
        return elected.mul_(2).sub_(1)
    return (mass >= 0).to(mass.dtype) * 2 - 1


def disjoint_mean(taus: Sequence[torch.Tensor], weights: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TIES disjoint merge: sum_{i in A} w_i tau_i / sum_{i in A} w_i, A = experts whose
    non-zero entry has the elected ``sign``; 0 where A is empty."""
    num = torch.zeros_like(taus[0])
    den = torch.zeros_like(taus[0])
    agreeing = torch.empty_like(taus[0])
    for w, tau in zip(weights.tolist(), taus):
        # |tau_i| where tau_i has the elected sign, else 0: in-place passes, no masks
        torch.mul(tau, sign, out=agreeing).clamp_min_(0)
        num.add_(agreeing, alpha=w)
        den.add_(agreeing.sign_(), alpha=w)
    # num is 0 wherever den is: dividing by a tiny floor there yields the 0 we want
    return num.mul_(sign).div_(den.clamp_min_(torch.finfo(den.dtype).tiny))


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


def row_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as (rows, entries per row): one row per output unit (the first axis,
    every other axis flattened); a vector or a scalar is one row."""
    return tensor.flatten(1) if tensor.dim() > 1 else tensor.reshape(1, -1)


def magnitude_band(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask: zero the ``top`` = round(gamma * numel) entries of
    largest |tau| and the smallest, keeping the ``kept_count(numel, density)`` entries
    ranked just below the top ones.

    Exactly k entries survive, ties in magnitude included; ``top`` shrinks when
    rounding would leave fewer than k entries below it.
    """
    numel = tau.numel()
    k = kept_count(numel, density)
    if k >= numel:
        return tau
    top = min(int(gamma * numel + 0.5), numel - k)
    flat = tau.reshape(-1)
    magnitudes = flat.abs().to(torch.float32 if flat.dtype != torch.float64 else flat.dtype).numpy()
    keep = torch.zeros_like(flat)
    keep[torch.from_numpy(_band_order(magnitudes, k, top))] = 1
    return (flat * keep).view(tau.shape)


class BandRule(NamedTuple):
    """Which entries Model Breadcrumbs' band keeps: lower <= |tau| < upper (no upper bound
    when None); when ``tied`` (a magnitude ties at a cut), only lower < |tau| < upper,
    plus the entries at the sorted positions ``at_cut``."""

    lower: np.floating
    upper: np.floating | None
    tied: bool = False
    at_cut: np.ndarray | None = None


def band_rule(theta: np.ndarray, base: np.ndarray, k: int, top: int) -> BandRule | None:
    """Which entries of tau = theta - base (1-D arrays) :func:`magnitude_band` keeps: the k
    ranked just below its ``top`` largest |tau|, between the (top + k)-th and the top-th
    largest (:func:`trim_cut`). When a magnitude ties at a cut, which of the tied entries
    argpartition keeps is found apart (:func:`band_kept_at_cuts`). None when a |tau| is
    NaN or inf."""
    lower = trim_cut(theta, base, top + k)
    if lower is None:
        return None
    upper = trim_cut(theta, base, top) if top else None
    return BandRule(lower.cut, upper.cut if upper else None, lower.tied or bool(upper and upper.tied))


def band_kept_at_cuts(theta: np.ndarray, base: np.ndarray, k: int, top: int, rule: BandRule) -> np.ndarray:
    """The positions (sorted) of the entries with |tau| at a cut of ``rule`` that
    :func:`magnitude_band` keeps: its argpartition's choice among tied magnitudes depends on
    its partitioning order over the whole array, so it runs on |tau| whole."""
    with np.errstate(invalid="ignore", over="ignore"):
        magnitudes = _magnitudes(theta, base)
    kept = _band_order(magnitudes, k, top)
    at_cut = magnitudes[kept] == rule.lower
    if rule.upper is not None:
        at_cut |= magnitudes[kept] == rule.upper
    return np.sort(kept[at_cut])


def _band_order(magnitudes: np.ndarray, k: int, top: int) -> np.ndarray:
    """The positions argpartition ranks k and more below the ``top`` largest."""
    # ascending order: the kept band holds sorted positions [low, high)
    n = magnitudes.size
    low, high = n - top - k, n - top
    return np.argpartition(magnitudes, [low, high] if high < n else low)[low:high]


def band_mask(
    magnitudes: np.ndarray, rule: BandRule, positions: slice | np.ndarray, out: np.ndarray, scratch: np.ndarray
) -> np.ndarray:
    """The entries at ``positions`` (a slice or sorted indices) that ``rule`` keeps, given
    their |tau|, as a boolean mask (into ``out``; ``scratch``: a bool array as long)."""
    keep = (np.greater if rule.tied else np.greater_equal)(magnitudes, rule.lower, out=out)
    if rule.upper is not None:
        np.logical_and(keep, np.less(magnitudes, rule.upper, out=scratch), out=keep)
    return keep if rule.at_cut is None else mark_positions(keep, rule.at_cut, positions)


def magnitude_rank_keep_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities, per row of ``tau`` (:func:`row_view`):

    k_j = density - epsilon + 2 epsilon r_j / (n - 1),

    r_j = 0..n-1 the rank of |tau_j| among the row's n entries (0: smallest; equal
    magnitudes ranked by position), so the drop probability p_j = 1 - k_j is largest
    for the smallest entries and spans 1 - density -/+ epsilon. A one-entry row keeps
    with probability ``density``.
    """
    rows = row_view(tau)
    n = rows.shape[1]
    if n < 2 or epsilon == 0:
        return torch.full_like(tau, density)
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand_as(order))
    return ((density - epsilon) + ranks.to(tau.dtype) * (2 * epsilon / (n - 1))).view(tau.shape)


def by_row_rank(magnitudes: np.ndarray, values: np.ndarray) -> np.ndarray | None:
    """``values[r_j]`` for every entry j of a (rows, n) float32 array of magnitudes, r_j its
    rank in its row (0: smallest; equal magnitudes ranked by position, as
    ``torch.argsort(stable=True)`` orders them; n < 2**32); None when a magnitude is NaN.

    One unstable sort of 64-bit keys (the magnitude's bits, then the position: all
    distinct, so any sort gives the stable order) is about 3x faster than a stable argsort.
    """
    n = magnitudes.shape[1]
    keys = magnitudes.view(np.uint32).astype(np.uint64)
    np.left_shift(keys, 32, out=keys)
    np.bitwise_or(keys, np.arange(n, dtype=np.uint64), out=keys)
    keys.sort(axis=1)
    if keys[:, -1].max() >> 32 > _INF_BITS:  # NaN sorts last; its payload, not its position, would order it
        return None
    order = np.bitwise_and(keys, 0xFFFFFFFF, out=keys).view(np.int64)
    out = np.empty(magnitudes.shape, values.dtype)
    np.put_along_axis(out, order, values[None, :], axis=1)
    return out


def della_drop(tau: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """DELLA: m_j ~ Bernoulli(k_j) with k_j from :func:`magnitude_rank_keep_probabilities`,
    return m * tau / k, so that E[m_j tau_j / k_j] = tau_j.

    m_j = [u_j < k_j] with u = ``torch.rand(tau.shape, generator=generator)``.
    """
    if density >= 1.0 or tau.numel() == 0:
        return tau
    keep = magnitude_rank_keep_probabilities(tau, density, epsilon)
    drawn = torch.rand(tau.shape, generator=generator) < keep
    return tau * drawn.to(tau.dtype) / keep
