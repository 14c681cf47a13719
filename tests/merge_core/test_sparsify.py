"""Masks: exact-k trimming per tensor and per whole task vector, DARE determinism."""

from __future__ import annotations

import pytest
import torch

from merge_core import Recipe, iter_merged, open_inputs
from merge_core.methods.sparsify import ModelMagnitudeTrim, kept_count, magnitude_trim
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
