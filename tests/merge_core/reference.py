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


def _rows(t, per_row):
    """(rows, n): one row per output unit (first axis) or the whole tensor as one row."""
    return t.reshape(t.shape[0], -1) if per_row and t.dim() > 1 else t.reshape(1, -1)


def model_stock(base, models, per_row=False):
    """Model Stock: theta_0 + t * mean_i tau_i, t = k c / (1 + (k-1) c), c the mean
    pairwise cosine of the tau_i (0 for a zero tau), clamped to [0, 1]."""
    taus = _stack(models) - base.double()
    rows = torch.stack([_rows(tau, per_row) for tau in taus])  # (k, rows, n)
    k = len(models)
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = torch.einsum("irn,jrn->ijr", unit, unit)
    pairs = torch.triu_indices(k, k, offset=1)
    c = cos[pairs[0], pairs[1]].mean(0).clamp(0, 1).unsqueeze(-1)
    t = k * c / (1 + (k - 1) * c)
    return base.double() + (t * rows.mean(0)).view(base.shape)


def breadcrumbs(base, models, weights, lam, density, gamma):
    """Breadcrumbs: of each tau_i keep the entries ranked top+1..top+k by |tau_i|,
    top = round(gamma numel), k = max(1, round(density numel)); task arithmetic."""
    taus = _stack(models) - base.double()
    flat = taus.reshape(len(models), -1)
    numel = flat.shape[1]
    k = max(1, min(numel, math.floor(density * numel + 0.5)))
    top = min(math.floor(gamma * numel + 0.5), numel - k)
    ranked = flat.abs().argsort(dim=1, descending=True, stable=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep.scatter_(1, ranked[:, top : top + k], True)
    kept = (flat * keep).view(taus.shape)
    return base.double() + lam * (_w(weights, kept) * kept).sum(0)


def della_keep_probabilities(tau, density, epsilon):
    """DELLA (mergekit's scale): per row, keep probability density - eps for the
    smallest |tau| rising linearly with rank to density + eps for the largest."""
    rows = _rows(tau.double(), per_row=True)
    n = rows.shape[1]
    if n == 1:
        return torch.full(tau.shape, float(density), dtype=torch.float64)
    rank = torch.empty(rows.shape, dtype=torch.float64)
    for r in range(rows.shape[0]):
        rank[r, rows[r].abs().argsort(stable=True)] = torch.arange(n, dtype=torch.float64)
    return (density - epsilon + 2 * epsilon * rank / (n - 1)).view(tau.shape)


def della(base, models, weights, lam, density, epsilon, uniforms):
    """DELLA: tau~_i = [u_i < k_i] tau_i / k_i with the given uniforms u_i, then TIES's
    sign election and disjoint mean."""
    taus = _stack(models) - base.double()
    dropped = []
    for tau, u in zip(taus, uniforms):
        keep = della_keep_probabilities(tau, density, epsilon)
        dropped.append(torch.where(u.double() < keep, tau / keep, 0.0))
    return ties_from_trimmed(base, torch.stack(dropped), weights, lam)


def _matrix(x):
    """(out, in * k ...) in float64: conv kernels flattened past the output channel."""
    return x.double().reshape(x.shape[0], -1)


def mean_task_vector(base, models, alpha):
    """theta_0 + alpha * (1/T) sum tau_i: the SVD merges' rule for non-matrix tensors."""
    taus = _stack(models) - base.double()
    return base.double() + alpha * taus.mean(0)


def _whiten(x):
    """x (x^T x)^(-1/2), the TSV paper's decorrelation of a basis of full column rank."""
    evals, evecs = torch.linalg.eigh(x.T @ x)
    return x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def _top(x, k):
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :k], s[:k], vh[:k].T


def _task_matrices(base, models):
    return [_matrix(m) - _matrix(base) for m in models]


def tsv(base, models, alpha):
    """TSV-Merge: theta_0 + alpha U_perp S V_perp^T over each task's top floor(r / T)."""
    k = min(_matrix(base).shape) // len(models) if base.dim() >= 2 else 0
    if k == 0:
        return mean_task_vector(base, models, alpha)
    us, ss, vs = zip(*(_top(tau, k) for tau in _task_matrices(base, models)))
    u, v = _whiten(torch.cat(us, 1)), _whiten(torch.cat(vs, 1))
    return base.double() + alpha * (u @ torch.diag(torch.cat(ss)) @ v.T).view(base.shape)


def iso_c(base, models, alpha):
    """Iso-C: theta_0 + alpha * mean(s) U V^T for sum tau_i = U diag(s) V^T."""
    if base.dim() < 2:
        return mean_task_vector(base, models, alpha)
    u, s, vh = torch.linalg.svd(sum(_task_matrices(base, models)), full_matrices=False)
    return base.double() + alpha * (s.mean() * u @ vh).view(base.shape)


def iso_cts(base, models, alpha, common_fraction):
    """Iso-CTS: Delta's top k (common) plus each tau_i's top s off the common left
    subspace, k + T s = r (FusionBench's allocation), whitened, spectrum flattened."""
    if base.dim() < 2:
        return mean_task_vector(base, models, alpha)
    taus = _task_matrices(base, models)
    r, n_tasks = min(taus[0].shape), len(taus)
    per_task = min(r // n_tasks, round((r - int(r * common_fraction)) / n_tasks))
    u_c, s_c, v_c = _top(sum(taus), r - n_tasks * per_task)
    parts = [(u_c, s_c, v_c)] + [_top(tau - u_c @ u_c.T @ tau, per_task) for tau in taus]
    us, ss, vs = zip(*parts)
    u, v = _whiten(torch.cat(us, 1)), _whiten(torch.cat(vs, 1))
    return base.double() + alpha * (torch.cat(ss).mean() * u @ v.T).view(base.shape)
