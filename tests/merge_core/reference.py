"""Direct re-derivations of each method's equation on whole stacked tensors.

Written from the papers, independently of merge_core's streaming code: no shared
helpers, vectorised over a leading model axis, float64 throughout.
"""

from __future__ import annotations

import math

import torch


def _stack(tensors):
    return torch.stack([t.double() for t in tensors])


def _w(weights, like):
    return torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * (like.dim() - 1)))


def average(models, weights):
    """sum w_i theta_i / sum w_i"""
    s = _stack(models)
    w = _w(weights, s)
    return (w * s).sum(0) / w.sum()


def task_arithmetic(base, models, weights, lam):
    """theta_0 + lambda sum w_i tau_i"""
    taus = _stack(models) - base.double()
    return base.double() + lam * (_w(weights, taus) * taus).sum(0)


def top_k_rows(taus, k):
    """Keep the k largest |tau| of every row (rows = flattened task vectors)."""
    flat = taus.reshape(taus.shape[0], -1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    idx = flat.abs().argsort(dim=1, descending=True, stable=True)[:, :k]
    keep.scatter_(1, idx, True)
    return (flat * keep).view(taus.shape)


def ties_from_trimmed(base, trimmed, weights, lam):
    """gamma = sgn(sum w_i tau_hat_i) (0 -> +); disjoint weighted mean over agreeing experts."""
    w = _w(weights, trimmed)
    gamma = torch.where((w * trimmed).sum(0) >= 0, 1.0, -1.0).double()
    agree = torch.sign(trimmed) == gamma
    den = (w * agree).sum(0)
    num = (w * trimmed * agree).sum(0)
    merged = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    return base.double() + lam * merged


def ties(base, models, weights, lam, density):
    """TIES with per-tensor trimming: k = max(1, round(density * numel))."""
    taus = _stack(models) - base.double()
    numel = taus[0].numel()
    k = max(1, min(numel, math.floor(density * numel + 0.5)))
    return ties_from_trimmed(base, top_k_rows(taus, k), weights, lam)


def slerp(a, b, t):
    a, b = a.double(), b.double()
    cos = torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm())
    omega = torch.arccos(cos.clamp(-1, 1))
    if torch.sin(omega) < 1e-6:  # the limit of slerp as Omega -> 0 is lerp
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def extreme(models, mode):
    s = _stack(models)
    mag = s.abs()
    # first model wins ties: argmax/argmin return the first occurrence
    idx = (mag.argmax(0) if mode == "max" else mag.argmin(0)).unsqueeze(0)
    return s.gather(0, idx).squeeze(0)
