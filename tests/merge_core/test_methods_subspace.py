"""TSV-Merge, Iso-C and Iso-CTS against their papers' equations on small matrices."""

from __future__ import annotations

import math

import pytest
import torch

from merge_core import Recipe
from merge_core.errors import MergeError, RecipeError
from merge_core.methods.iso_cts import subspace_sizes
from tests.merge_core import reference as ref
from tests.merge_core.test_methods import run

SVD_METHODS = ["tsv", "iso_c", "iso_cts"]


def rotation(n, seed):
    """A random n x n orthogonal matrix."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def experts_of(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def reference(method, base, models, alpha, common_fraction=0.8):
    if method == "iso_cts":
        return ref.iso_cts(base, models, alpha, common_fraction)
    return getattr(ref, method)(base, models, alpha)


@pytest.mark.parametrize("shape", [(8, 6), (6, 8), (6, 2, 3), (5, 1, 4)], ids=["tall", "wide", "conv", "depthwise"])
@pytest.mark.parametrize("method", SVD_METHODS)
def test_matches_the_papers_equations(method, shape):
    base, models = experts_of(shape)
    got = run(method, base, models, alpha=0.7, **({"common_fraction": 0.5} if method == "iso_cts" else {}))
    want = reference(method, base, models, 0.7, common_fraction=0.5)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape", [(2, 2), (2, 5), (5, 2)])
def test_iso_c_flattens_singular_values_3_and_1_to_2(shape):
    m, n = shape
    u, v = rotation(m, 1)[:, :2], rotation(n, 2)[:, :2]
    tau = (u @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ v.T).float()
    base = torch.zeros(shape)
    got = run("iso_c", base, [base + tau], alpha=0.5)
    torch.testing.assert_close(got.double(), 0.5 * 2.0 * (u @ v.T), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 8), (8, 6)])
def test_tsv_of_tasks_on_orthogonal_supports_is_task_arithmetic(shape):
    # each task lives on its own rows and columns (rank <= 3 = floor(r / T)): the
    # concatenated singular vectors are already orthonormal and TSV changes nothing
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g)
    taus = [torch.zeros(shape), torch.zeros(shape)]
    rows, cols = shape[0] // 2, shape[1] // 2
    taus[0][:rows, :cols] = torch.randn(rows, cols, generator=g)
    taus[1][rows:, cols:] = torch.randn(shape[0] - rows, shape[1] - cols, generator=g)
    got = run("tsv", base, [base + t for t in taus], alpha=0.7)
    torch.testing.assert_close(got, base + 0.7 * (taus[0] + taus[1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 6), (6, 8)])
def test_tsv_basis_is_orthonormal_and_keeps_each_tasks_top_singular_values(shape):
    base, models = experts_of(shape, n=4)  # k = floor(6 / 4) = 1: rank 4 of 6
    got = run("tsv", base, models, alpha=2.0)
    k = min(shape) // len(models)
    kept = torch.cat([torch.linalg.svdvals((m - base).double())[:k] for m in models])
    # U_perp S V_perp^T with orthonormal U_perp, V_perp has exactly the kept S as singular values
    merged = torch.linalg.svdvals((got - base).double() / 2.0)
    torch.testing.assert_close(merged[: len(kept)], kept.sort(descending=True).values, rtol=0, atol=1e-5)
    assert merged[len(kept) :].abs().max() < 1e-5


@pytest.mark.parametrize("method, params", [("iso_c", {}), ("iso_cts", {"common_fraction": 0.5})])
@pytest.mark.parametrize("shape", [(8, 6), (6, 8)])
def test_iso_spectrum_is_flat_over_an_orthonormal_basis(method, params, shape):
    base, models = experts_of(shape)
    got = run(method, base, models, alpha=1.0, **params)
    s = torch.linalg.svdvals((got - base).double())
    assert s.numel() == min(shape)
    torch.testing.assert_close(s, s.mean().expand_as(s), rtol=1e-5, atol=0)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    base, models = experts_of((8, 6))
    got = run("iso_cts", base, models, alpha=1.1, common_fraction=1.0)
    torch.testing.assert_close(got, run("iso_c", base, models, alpha=1.1), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "rank, tasks, fraction, sizes",
    [(8, 3, 0.8, (5, 1)), (8, 3, 0.5, (5, 1)), (3, 3, 0.5, (0, 1)), (2, 3, 0.3, (2, 0)), (768, 8, 0.8, (616, 19))],
)
def test_iso_cts_subspace_sizes(rank, tasks, fraction, sizes):
    # FusionBench's allocation; (2, 3, 0.3) would make its common part negative: capped
    assert subspace_sizes(rank, tasks, fraction) == sizes


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("shape", [(5,), (1,), ()])
def test_non_matrix_tensors_get_the_mean_task_vector(method, shape):
    base, models = experts_of(shape)
    got = run(method, base, models, alpha=0.6)
    torch.testing.assert_close(got.double(), ref.mean_task_vector(base, models, 0.6), rtol=0, atol=1e-6)


def test_tsv_matrix_of_rank_below_the_task_count_gets_the_mean_task_vector():
    base, models = experts_of((1, 6))  # r = 1 < T = 3: floor(r / T) = 0 components per task
    got = run("tsv", base, models, alpha=0.6)
    torch.testing.assert_close(got.double(), ref.mean_task_vector(base, models, 0.6), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_conv_kernels_are_merged_as_out_by_in_times_k_matrices(method):
    base, models = experts_of((6, 2, 3))
    got = run(method, base, models, alpha=0.9)
    flat = run(method, base.reshape(6, 6), [m.reshape(6, 6) for m in models], alpha=0.9)
    torch.testing.assert_close(got, flat.view(6, 2, 3), rtol=0, atol=0)


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("shape", [(6, 8), (8, 6), (4,)])
def test_zero_task_vectors_give_the_base(method, shape):
    base, _ = experts_of(shape)
    got = run(method, base, [base.clone(), base.clone(), base.clone()], alpha=1.5)
    assert torch.equal(got, base)


def test_tsv_ignores_a_zero_task_vector_beside_a_real_one():
    # a zero tau's singular vectors are arbitrary unit vectors: dropped, they cannot
    # bend the other task's basis; what is left is tau_1 truncated to floor(r / T) = 3
    base, (model, _, _) = experts_of((8, 6))
    got = run("tsv", base, [model, base.clone()], alpha=1.0)
    u, s, vh = torch.linalg.svd((model - base).double(), full_matrices=False)
    torch.testing.assert_close(got.double(), base.double() + u[:, :3] @ torch.diag(s[:3]) @ vh[:3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_keeps_a_rank_deficient_sum_in_its_span(method):
    # rank-1 task vectors (as LoRA-like updates are low rank): the flat spectrum is over
    # the one non-zero singular value, not over min(m, n) with arbitrary null directions
    g = torch.Generator().manual_seed(4)
    u, v = torch.randn(8, 1, generator=g), torch.randn(1, 6, generator=g)
    base = torch.randn(8, 6, generator=g)
    got = run(method, base, [base + u @ v, base + 2 * u @ v], alpha=1.0)
    torch.testing.assert_close(got, base + 3 * u @ v, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_a_failed_decomposition_names_the_tensor(method):
    # what allow_nonfinite lets through: LAPACK refuses it, and the error says where
    base, models = experts_of((6, 4))
    models[1][2, 3] = math.nan
    with pytest.raises(MergeError, match="tensor 'encoder.w': .*non-finite"):
        run(method, base, models, name="encoder.w")


def recipe(method, parameters=None, weights=(1.0, 1.0)):
    return Recipe.from_mapping({
        "method": method,
        "base_model": "base.safetensors",
        "models": [{"model": f"e{i}.safetensors", "weight": w} for i, w in enumerate(weights)],
        "parameters": parameters or {},
        "output": "out.safetensors",
    })


@pytest.mark.parametrize(
    "method, parameters, message",
    [
        ("tsv", {"alpha": "big"}, "parameter 'alpha' must be a finite number"),
        ("iso_c", {"alpha": math.inf}, "parameter 'alpha' must be a finite number"),
        ("iso_cts", {"alpha": True}, "parameter 'alpha' must be a finite number"),
        ("iso_cts", {"common_fraction": 0}, r"'common_fraction' must lie in \(0, 1\]"),
        ("iso_cts", {"common_fraction": 1.5}, r"'common_fraction' must lie in \(0, 1\]"),
        ("tsv", {"common_fraction": 0.5}, "method 'tsv' takes no parameter"),
        ("iso_c", {"lambda": 1.0}, "method 'iso_c' takes no parameter"),
    ],
)
def test_bad_parameters_are_refused(method, parameters, message):
    with pytest.raises(RecipeError, match=message):
        recipe(method, parameters)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_weights_are_refused(method):
    with pytest.raises(RecipeError, match=f"method {method!r} does not use weights"):
        recipe(method, weights=(1.0, 2.0))


def test_defaults_are_the_papers():
    assert recipe("tsv").parameters_for("w") == {"alpha": 1.0}
    assert recipe("iso_c").parameters_for("w") == {"alpha": 1.0}
    assert recipe("iso_cts").parameters_for("w") == {"alpha": 1.0, "common_fraction": 0.8}
