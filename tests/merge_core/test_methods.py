"""Each method's numbers against a direct re-derivation of its paper's equation."""

from __future__ import annotations

import pytest
import torch

from merge_core.registry import TensorInputs, available_methods, get_method
from merge_core.methods.sparsify import magnitude_trim
from tests.merge_core import reference as ref


def run(method, base, models, weights=None, name="w", **params):
    m = get_method(method)
    weights = [1.0] * len(models) if weights is None else weights
    inputs = TensorInputs(
        name=name,
        base=base,
        models=models,
        weights=torch.tensor(weights, dtype=torch.float64),
        trim=lambda tau, i, d: magnitude_trim(tau, d),
    )
    return m.fn(inputs, {**m.defaults, **params})


@pytest.fixture
def experts():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 12, generator=g)
    models = [base + 0.1 * torch.randn(16, 12, generator=g) for _ in range(3)]
    return base, models


def test_registry_lists_every_method():
    assert available_methods() == [
        "average",
        "breadcrumbs",
        "dare_linear",
        "dare_ties",
        "della",
        "extreme",
        "iso_c",
        "iso_cts",
        "model_stock",
        "regmean",
        "slerp",
        "task_arithmetic",
        "ties",
        "tsv",
    ]


@pytest.mark.parametrize("weights", [[1, 1, 1], [4, 1, 1], [0.5, 0, 2]])
def test_average_is_the_weighted_mean(experts, weights):
    _, models = experts
    got = run("average", None, models, weights)
    torch.testing.assert_close(got.double(), ref.average(models, weights), rtol=0, atol=1e-6)


def test_average_of_identical_models_is_that_model(experts):
    base, _ = experts
    torch.testing.assert_close(run("average", None, [base, base, base]), base, rtol=2e-7, atol=0)


@pytest.mark.parametrize("lam", [1.0, 0.4, -0.5])
def test_task_arithmetic(experts, lam):
    base, models = experts
    weights = [1.0, 0.5, 2.0]
    got = run("task_arithmetic", base, models, weights, **{"lambda": lam})
    torch.testing.assert_close(got.double(), ref.task_arithmetic(base, models, weights, lam), rtol=0, atol=1e-6)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.01])
@pytest.mark.parametrize("weights", [[1, 1, 1], [3, 1, 0.5]])
def test_ties_per_tensor(experts, density, weights):
    base, models = experts
    got = run("ties", base, models, weights, density=density, **{"lambda": 0.7})
    torch.testing.assert_close(got.double(), ref.ties(base, models, weights, 0.7, density), rtol=0, atol=1e-6)


def test_ties_keeps_exactly_k_when_magnitudes_tie():
    # bf16-like deltas: every entry has the same magnitude; a >= threshold would keep all 10
    tau = torch.tensor([0.5, -0.5] * 5)
    kept = magnitude_trim(tau, 0.3)
    assert int((kept != 0).sum()) == 3


def test_ties_sign_vote_tie_elects_positive():
    base = torch.zeros(4)
    models = [torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([-1.0, 2.0, -1.0, 0.0])]
    got = run("ties", base, models, density=1.0)
    # entry 0 and 1: equal and opposite mass -> + elected, only the positive expert counts;
    # entry 2: mass +2 -> +, mean over the one agreeing expert; entry 3: nobody -> 0
    assert got.tolist() == [1.0, 2.0, 3.0, 0.0]


def test_ties_all_zero_task_vectors_return_the_base(experts):
    base, _ = experts
    got = run("ties", base, [base.clone(), base.clone()], density=0.3)
    assert torch.equal(got, base)


def test_one_element_tensor_keeps_its_delta_at_low_density():
    base = torch.tensor([2.0])
    models = [torch.tensor([3.0]), torch.tensor([2.5])]
    got = run("ties", base, models, density=0.2)
    # k = max(1, round(0.2)) = 1: both deltas kept, both positive, mean 0.75
    assert got.tolist() == [2.75]
    assert run("dare_linear", base, models, density=0.2).shape == (1,)


def test_dare_linear_expected_value_and_rescale(experts):
    base, models = experts
    density = 0.3
    got = run("dare_linear", base, models, density=density, seed=1)
    # each expert's surviving entries are tau_i / density; the sum is over experts
    from merge_core.methods.sparsify import dare_drop, tensor_seed

    expected = base.double().clone()
    for i, m in enumerate(models):
        kept = dare_drop((m - base).double(), density, torch.Generator().manual_seed(tensor_seed(1, "w", i)))
        survivors = kept != 0
        torch.testing.assert_close(kept[survivors], ((m - base).double() / density)[survivors])
        assert abs(survivors.double().mean().item() - density) < 0.15
        expected += kept
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_drops_are_deterministic_per_seed_and_name(experts, method):
    base, models = experts
    a = run(method, base, models, name="x", seed=3)
    assert torch.equal(a, run(method, base, models, name="x", seed=3))
    assert not torch.equal(a, run(method, base, models, name="x", seed=4))
    assert not torch.equal(a, run(method, base, models, name="y", seed=3))


def test_dare_ties_equals_ties_on_the_dropped_vectors(experts):
    base, models = experts
    got = run("dare_ties", base, models, density=0.5, seed=7, **{"lambda": 0.8})
    from merge_core.methods.sparsify import dare_drop, tensor_seed

    # rebuild tau~_i with the same per-(seed, name, i) generators

    taus = torch.stack(
        [
            dare_drop((m - base).double(), 0.5, torch.Generator().manual_seed(tensor_seed(7, "w", i)))
            for i, m in enumerate(models)
        ]
    )
    expected = ref.ties_from_trimmed(base, taus, [1, 1, 1], 0.8)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp(experts, t):
    _, models = experts
    a, b = models[0], models[1]
    got = run("slerp", None, [a, b], t=t)
    torch.testing.assert_close(got.double(), ref.slerp(a, b, t), rtol=0, atol=1e-5)


def test_slerp_of_parallel_vectors_is_lerp():
    a = torch.tensor([1.0, 2.0, 3.0])
    got = run("slerp", None, [a, 2 * a], t=0.5)
    torch.testing.assert_close(got, 1.5 * a)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_extreme(experts, mode):
    _, models = experts
    got = run("extreme", None, models, mode=mode)
    torch.testing.assert_close(got.double(), ref.extreme(models, mode), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_half_precision_inputs_are_computed_in_float32(experts, dtype, method):
    base, models = experts
    half = [m.to(dtype) for m in models]
    got = run(method, base.to(dtype).float(), [m.float() for m in half], density=0.5)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
