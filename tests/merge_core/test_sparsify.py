"""Masks: exact-k trimming per tensor and per whole task vector, DARE determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge_core import Recipe, iter_merged, open_inputs
from merge_core.methods.sparsify import (
    ModelMagnitudeTrim,
    della_drop,
    disjoint_mean,
    elect_sign,
    kept_count,
    magnitude_trim,
    tensor_seed,
)
from merge_core.registry import TensorInputs, get_method
from tests.merge_core.conftest import make_state, save_kind


def bf16_task_vector(seed: int, sizes: list[int]) -> list[torch.Tensor]:
    """Deltas quantised like bf16 checkpoints: few distinct magnitudes, many ties."""
    g = torch.Generator().manual_seed(seed)
    return [(0.01 * torch.randn(n, generator=g)).to(torch.bfloat16).float() for n in sizes]


def trim_whole_vector(tensors: list[torch.Tensor], density: float, order: list[int]) -> list[torch.Tensor]:
    trim = ModelMagnitudeTrim()
    for i in order:
        trim.observe("tau", tensors[i], density)
    trim.finalize()
    out = [None] * len(tensors)
    for i in order:
        out[i] = trim.apply("tau", tensors[i])
    return out


@pytest.mark.parametrize("density", [0.5, 0.37, 0.2, 0.01])
def test_model_scope_keeps_exactly_k_despite_bf16_ties(density):
    tensors = bf16_task_vector(0, [50_000, 1, 7, 120_000, 30_001])
    total = sum(t.numel() for t in tensors)
    kept = trim_whole_vector(tensors, density, list(range(len(tensors))))
    n_kept = sum(int((k != 0).sum()) for k in kept)
    assert n_kept == int(density * total + 0.5)
    assert abs(n_kept / total - density) <= 0.001 * density


def test_model_scope_keeps_the_largest_magnitudes():
    tensors = bf16_task_vector(1, [40_000, 25_000])
    kept = trim_whole_vector(tensors, 0.25, [0, 1])
    flat, flat_kept = torch.cat(tensors).abs(), torch.cat(kept)
    # every kept magnitude is >= every dropped one (ties at the cut may go either way)
    assert flat[flat_kept != 0].min() >= flat[flat_kept == 0].max()


def test_model_scope_equals_global_top_k_without_ties():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(n, generator=g) for n in (1000, 3, 5000)]
    kept = trim_whole_vector(tensors, 0.1, [0, 1, 2])
    flat = torch.cat(tensors)
    k = int(0.1 * flat.numel() + 0.5)
    want = torch.zeros_like(flat)
    idx = flat.abs().topk(k).indices
    want[idx] = flat[idx]
    assert torch.equal(torch.cat(kept), want)


def test_model_scope_count_does_not_depend_on_visit_order():
    tensors = bf16_task_vector(3, [10_000, 20_000, 5])
    a = trim_whole_vector(tensors, 0.3, [0, 1, 2])
    b = trim_whole_vector(tensors, 0.3, [2, 0, 1])
    assert sum(int((t != 0).sum()) for t in a) == sum(int((t != 0).sum()) for t in b)


def test_all_zero_task_vector_survives_model_scope():
    kept = trim_whole_vector([torch.zeros(100), torch.zeros(3)], 0.5, [0, 1])
    assert all(torch.equal(k, torch.zeros_like(k)) for k in kept)


@pytest.mark.parametrize("numel, density, k", [(1, 0.2, 1), (1, 1.0, 1), (10, 0.25, 3), (10, 0.2, 2), (4, 1.0, 4)])
def test_kept_count(numel, density, k):
    assert kept_count(numel, density) == k


def test_per_tensor_trim_keeps_the_largest():
    tau = torch.tensor([0.1, -3.0, 2.0, -0.5, 0.0])
    assert magnitude_trim(tau, 0.4).tolist() == [0.0, -3.0, 2.0, 0.0, 0.0]


def test_dare_masks_do_not_depend_on_visit_order(tmp_path):
    base = make_state(0)
    paths = [save_kind(s, tmp_path, f"m{i}", "safetensors") for i, s in enumerate([base, make_state(1, base), make_state(2, base)])]
    recipe = Recipe.from_mapping(
        {
            "method": "dare_ties",
            "base_model": str(paths[0]),
            "models": [str(p) for p in paths[1:]],
            "parameters": {"density": 0.5, "seed": 11},
            "output": str(tmp_path / "unused.safetensors"),
        }
    )
    with open_inputs(recipe) as inputs:
        names = inputs.template.keys()
        forward = dict(iter_merged(recipe, inputs, names, progress=False))
        backward = dict(iter_merged(recipe, inputs, names[::-1], progress=False))
    assert all(torch.equal(forward[n], backward[n]) for n in names)


# ---- the optimised per-tensor TIES against the straightforward code it replaced, bit for bit


def straightforward_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Exact-k trimming as first written: numpy.argpartition's k largest |tau| (which
    of the entries tied at the cut it keeps is argpartition's choice), one float mask."""
    flat = tau.reshape(-1)
    n = flat.numel()
    k = max(1, min(n, int(density * n + 0.5)))
    if k >= n:
        return tau
    magnitudes = flat.abs().to(torch.float64 if flat.dtype == torch.float64 else torch.float32).numpy()
    keep = torch.zeros_like(flat)
    keep[torch.from_numpy(np.argpartition(magnitudes, n - k)[n - k :])] = 1
    return (flat * keep).view(tau.shape)


def straightforward_ties(base, models, weights, lam, density):
    """TIES as first written: trim, gamma = sgn(sum w_i tau_hat_i) (0 -> +), disjoint
    weighted mean of the agreeing entries, theta_0 + lambda * tau_m."""
    trimmed = [straightforward_trim(m - base, density) for m in models]
    mass = torch.zeros_like(base)
    for w, tau in zip(weights, trimmed):
        mass.add_(tau, alpha=w)
    sign = (mass >= 0).to(base.dtype) * 2 - 1
    num, den = torch.zeros_like(base), torch.zeros_like(base)
    for w, tau in zip(weights, trimmed):
        agreeing = (tau * sign).clamp_min_(0)
        num.add_(agreeing, alpha=w)
        den.add_(agreeing.sign_(), alpha=w)
    return base + lam * (sign * num / den.clamp_min(torch.finfo(den.dtype).tiny))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads and the signs of zeros included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def task_vectors_like(kind: str, shape: tuple[int, ...], dtype: torch.dtype, experts: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    deltas = [1e-3 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(experts)]
    if kind == "bf16":  # few distinct magnitudes: ties at the cut
        deltas = [d.to(torch.bfloat16).double() for d in deltas]
    if kind == "zero":
        deltas = [torch.zeros(shape, dtype=torch.float64) for _ in range(experts)]
    if kind == "nonfinite":  # allow_nonfinite merges: NaN and inf must propagate as they did
        deltas[0].view(-1)[:: max(1, deltas[0].numel() // 3)] = float("nan")
        deltas[-1].view(-1)[0] = float("inf")
    return base.to(dtype), [(base + d).to(dtype) for d in deltas]


# sizes: whole-array selection, the sampled bracket (>= 4096 entries), threads and several
# chunks and spans (>= 65536 entries)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (80, 64), (3, 50_000)])
@pytest.mark.parametrize("kind", ["gauss", "bf16", "zero", "nonfinite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_per_tensor_is_bit_identical_to_the_straightforward_code(shape, kind, dtype):
    method = get_method("ties")
    base, models = task_vectors_like(kind, shape, dtype, 3, seed=len(shape) + shape[0])
    for density, weights, lam in [(0.2, [1.0, 1.0, 1.0], 1.0), (0.01, [3.0, 0.5, 0.0], 0.7), (0.999, [1.0, 2.0, 1.0], 1.3)]:
        inputs = TensorInputs("w", base, models, torch.tensor(weights, dtype=torch.float64), trim=lambda tau, i, d: magnitude_trim(tau, d))
        got = method.fn(inputs, {**method.defaults, "density": density, "lambda": lam})
        want = straightforward_ties(base, models, weights, lam, density)
        assert same_bits(got, want), (density, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_magnitude_trim_keeps_argpartitions_entries_with_ties_nan_and_inf(dtype):
    g = torch.Generator().manual_seed(5)
    for n in (5, 5000, 20_000):
        tau = (torch.randn(n, generator=g) * 4).round() / 4  # magnitudes tie everywhere
        tau[:: n // 5] = float("nan")
        tau[1 :: n // 5] = -float("inf")
        clean = torch.randn(n, generator=g)  # no ties: the sampled bracket's path
        for t in (tau.to(dtype), clean.to(dtype)):
            for density in (0.001, 0.3, 0.9):
                assert same_bits(magnitude_trim(t, density), straightforward_trim(t, density)), (n, density)


# ---- breadcrumbs and DELLA, fused on threads, against their step-by-step code, bit for bit


def straightforward_band(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs' band as first written: the entries argpartition ranks in [low, high)."""
    flat = tau.reshape(-1)
    n = flat.numel()
    k = kept_count(n, density)
    if k >= n:
        return tau
    top = min(int(gamma * n + 0.5), n - k)
    magnitudes = flat.abs().to(torch.float64 if flat.dtype == torch.float64 else torch.float32).numpy()
    low, high = n - top - k, n - top
    order = np.argpartition(magnitudes, [low, high] if high < n else low)
    keep = torch.zeros_like(flat)
    keep[torch.from_numpy(order[low:high])] = 1
    return (flat * keep).view(tau.shape)


def stepwise_breadcrumbs(base, models, weights, lam, density, gamma):
    delta = torch.zeros_like(base)
    for w, theta in zip(weights, models):
        delta.add_(straightforward_band(theta - base, density, gamma), alpha=w)
    return base + lam * delta


def stepwise_della(name, base, models, weights, lam, density, epsilon, seed):
    dropped = [
        della_drop(theta - base, density, epsilon, torch.Generator().manual_seed(tensor_seed(seed, name, i)))
        for i, theta in enumerate(models)
    ]
    w = torch.tensor(weights, dtype=torch.float64)
    return base + lam * disjoint_mean(dropped, w, elect_sign(dropped, w))


# (300, 700): rows in two blocks of DELLA's sort
@pytest.mark.parametrize("shape", [(1,), (7, 3), (80, 64), (3, 50_000), (300, 700)])
@pytest.mark.parametrize("kind", ["gauss", "bf16", "zero", "nonfinite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_breadcrumbs_and_della_are_bit_identical_to_their_step_by_step_code(shape, kind, dtype):
    base, models = task_vectors_like(kind, shape, dtype, 3, seed=len(shape) + shape[0])
    for density, weights, lam in [(0.9, [1.0, 1.0, 1.0], 1.0), (0.3, [3.0, 0.5, 0.0], 0.7)]:
        w = torch.tensor(weights, dtype=torch.float64)
        crumbs = get_method("breadcrumbs").fn(TensorInputs("w", base, models, w), {"lambda": lam, "density": density, "gamma": 0.01})
        assert same_bits(crumbs, stepwise_breadcrumbs(base, models, weights, lam, density, 0.01)), (density, weights)
        della = get_method("della").fn(TensorInputs("w", base, models, w), {"lambda": lam, "density": density, "epsilon": 0.1, "seed": 3})
        assert same_bits(della, stepwise_della("w", base, models, weights, lam, density, 0.1, 3)), (density, weights)
