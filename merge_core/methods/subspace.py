"""Steps shared by the SVD merges (``tsv``, ``iso_c``, ``iso_cts``).

A tensor with two or more dimensions is merged as the matrix (out, in * k1 * ...): a
conv kernel (out, in, k) becomes (out, in * k), one row per output channel. Any other
tensor (bias, norm, scale) gets theta_0 + alpha * mean_i tau_i, as FusionBench does.

Singular values at or below max(m, n) * eps * sigma_ref (the rank tolerance of LAPACK
and ``torch.linalg.matrix_rank``) are numerical zeros. An SVD still returns unit
singular vectors for them, pointing anywhere, so they are dropped rather than
orthogonalised or given the mean singular value: a zero task vector adds nothing, and
all-zero task vectors give theta_0.

SVDs run in the compute dtype (float32, float64 for float64 inputs): the task vectors are
only float32-accurate, the polar factor by SVD is orthonormal to working precision however
ill-conditioned the concatenated basis, and on the tests' matrices the float32 results lie
within 5e-7 of a float64 reference, so float64 would double time and memory for nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from merge_core.errors import MergeError
from merge_core.registry import MergeFn, TensorInputs


@dataclass(frozen=True)
class Components:
    """Rank-one components u_j s_j v_j^T of a matrix: columns of ``u`` (m, c), values
    ``s`` (c,), rows of ``vh`` (c, n); an SVD's come in decreasing order of s_j."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def top(self, k: int) -> Components:
        """The k components of largest singular value, copied so the full SVD can be freed."""
        return Components(self.u[:, :k].clone(), self.s[:k].clone(), self.vh[:k].clone())

    def above(self, tolerance: float) -> Components:
        """The components whose singular value exceeds ``tolerance``."""
        keep = self.s > tolerance
        return Components(self.u[:, keep], self.s[keep], self.vh[keep])

    @property
    def largest(self) -> float:
        """sigma_max, 0 when there is no component."""
        return float(self.s[0]) if self.s.numel() else 0.0


def concatenate(parts: Sequence[Components]) -> Components:
    """U = [U_1 ... U_T], S = blockdiag(S_1 ... S_T) (as a vector), V = [V_1 ... V_T]."""
    return Components(
        torch.cat([p.u for p in parts], dim=1),
        torch.cat([p.s for p in parts]),
        torch.cat([p.vh for p in parts], dim=0),
    )


def is_matrix(x: torch.Tensor) -> bool:
    """Tensors merged through their singular vectors: two or more dimensions."""
    return x.dim() >= 2


def matrix_view(x: torch.Tensor) -> torch.Tensor:
    """x as the (out, in * k1 * ...) matrix: conv kernels flattened past the output channel."""
    return x.reshape(x.shape[0], -1)


def matrix_rank_bound(t: TensorInputs) -> int:
    """r = min(m, n) of the tensor's matrix view."""
    return min(matrix_view(t.base).shape)


def task_matrices(t: TensorInputs) -> Iterator[torch.Tensor]:
    """tau_i = theta_i - theta_0 as matrices, one expert at a time."""
    for theta in t.models:
        yield matrix_view(theta - t.base)


def summed_task_matrix(t: TensorInputs) -> torch.Tensor:
    """Delta = sum_i tau_i as a matrix (the task-arithmetic sum)."""
    delta = torch.zeros_like(matrix_view(t.base))
    for tau in task_matrices(t):
        delta.add_(tau)
    return delta


def svd(x: torch.Tensor) -> Components:
    """x = U S V^T, thin: min(m, n) components.

    A wide matrix is decomposed as its transpose, x^T = V S U^T: torch's CPU SVD of a
    row-major wide matrix is about 3x slower than of the tall one (1024 x 4096, float32).
    """
    if x.shape[0] < x.shape[1]:
        u, s, vh = torch.linalg.svd(x.T, full_matrices=False)
        return Components(vh.T, s, u.T)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return Components(u, s, vh)


def rank_tolerance(t: TensorInputs, sigma_ref: float) -> float:
    """max(m, n) * eps * sigma_ref for the tensor's matrix view: singular values at or
    below it are numerical zeros."""
    return max(matrix_view(t.base).shape) * torch.finfo(t.base.dtype).eps * sigma_ref


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    """x_perp = P Q^T for x = P Sigma Q^T: the matrix with orthonormal columns (rows, when
    x is wide) nearest to x in Frobenius norm (orthogonal Procrustes); equal to
    x (x^T x)^(-1/2) when x has full column rank. Backward stable, so x_perp is
    orthonormal to working precision however ill-conditioned x is."""
    factors = svd(x)
    return factors.u @ factors.vh


def flat_spectrum(s: torch.Tensor) -> torch.Tensor:
    """sigma_bar * 1, sigma_bar = mean_j s_j (an empty spectrum stays empty)."""
    return torch.full_like(s, float(s.sum()) / max(s.numel(), 1))


def compose(t: TensorInputs, alpha: float, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """theta_0 + alpha * U diag(s) V^T, reshaped to the tensor's shape."""
    return t.base + alpha * ((u * s) @ vh).view(t.base.shape)


def mean_task_vector_merge(t: TensorInputs, alpha: float) -> torch.Tensor:
    """theta_0 + alpha * (1/T) sum_i tau_i: what non-matrix tensors get."""
    delta = torch.zeros_like(t.base)
    for theta in t.models:
        delta.add_(theta - t.base)
    return t.base + (alpha / len(t.models)) * delta


def names_failed_decompositions(fn: MergeFn) -> MergeFn:
    """Turn LAPACK's failure (non-finite values let through by ``allow_nonfinite``, or no
    convergence) into a MergeError naming the tensor."""

    @functools.wraps(fn)
    def merge(t: TensorInputs, p: Mapping[str, Any]) -> torch.Tensor:
        try:
            return fn(t, p)
        except torch.linalg.LinAlgError as e:
            raise MergeError(f"tensor {t.name!r}: {e} The SVD merges need finite task vectors.") from None

    return merge
