"""Model Stock, Model Breadcrumbs and DELLA against hand-computed numbers and their
papers' equations on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from merge_core import Recipe
from merge_core.errors import RecipeError
from merge_core.methods.sparsify import della_drop, magnitude_band, magnitude_rank_keep_probabilities, tensor_seed
from tests.merge_core import reference as ref
from tests.merge_core.test_methods import run


@pytest.fixture
def experts():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 10, generator=g)
    models = [base + 0.1 * torch.randn(6, 10, generator=g) for _ in range(3)]
    return base, models


def recipe(method: str, n: int = 2, **fields) -> Recipe:
    models = [f"expert{i}.safetensors" for i in range(n)]
    return Recipe.from_mapping(
        {"method": method, "base_model": "base.safetensors", "models": models, "output": "out.safetensors", **fields}
    )


# --- model_stock


def test_model_stock_of_orthogonal_task_vectors_is_the_base():
    base = torch.tensor([1.0, 2.0, 3.0])
    models = [base + torch.tensor([1.0, 0.0, 0.0]), base + torch.tensor([0.0, 2.0, 0.0])]
    # cos = 0 -> t = 0
    assert torch.equal(run("model_stock", base, models), base)


def test_model_stock_of_identical_task_vectors_is_their_mean():
    base = torch.tensor([1.0, 2.0, 3.0])
    models = [base + torch.tensor([0.5, -1.0, 2.0])] * 3
    # cos = 1 -> t = 3 / (1 + 2) = 1: the average of the experts
    torch.testing.assert_close(run("model_stock", base, models), models[0], rtol=0, atol=1e-6)


def test_model_stock_three_experts_by_hand():
    base = torch.tensor([1.0, -1.0])
    taus = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]), torch.tensor([0.0, 2.0])]
    # pairwise cosines 1, 0, 0 -> cos = 1/3; t = 3 (1/3) / (1 + 2/3) = 3/5;
    # mean tau = (4/3, 2/3) -> theta_0 + (0.8, 0.4)
    got = run("model_stock", base, [base + tau for tau in taus])
    torch.testing.assert_close(got, torch.tensor([1.8, -0.6]), rtol=0, atol=1e-6)


def test_model_stock_opposite_task_vectors_clamp_to_the_base():
    # cos = -1: the paper's ratio 2c / (1 + c) would divide by zero; the clamp gives t = 0
    base = torch.zeros(4)
    got = run("model_stock", base, [base + 1.0, base - 1.0])
    assert torch.equal(got, base)


def test_model_stock_zero_task_vector_counts_as_orthogonal():
    base = torch.tensor([0.0, 0.0])
    models = [base.clone(), torch.tensor([2.0, 0.0]), torch.tensor([4.0, 0.0])]
    # cosines: (0, 0, 1) -> c = 1/3, t = 3/5; mean tau = (2, 0) -> (1.2, 0)
    torch.testing.assert_close(run("model_stock", base, models), torch.tensor([1.2, 0.0]), rtol=0, atol=1e-6)


def test_model_stock_filter_wise_takes_one_angle_per_row():
    base = torch.zeros(2, 2)
    models = [torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[2.0, 2.0], [0.0, 1.0]])]
    # row 0: parallel, t = 1 -> mean (1.5, 1.5); row 1: orthogonal, t = 0 -> base
    got = run("model_stock", base, models, filter_wise=True)
    assert got.tolist() == [[1.5, 1.5], [0.0, 0.0]]
    # over the whole tensor: cos = 4 / (sqrt(3) sqrt(9)), one t for both rows
    c = 4 / (math.sqrt(3) * 3)
    t = 2 * c / (1 + c)
    whole = run("model_stock", base, models)
    torch.testing.assert_close(whole, t * torch.stack(models).mean(0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 10), (4, 3, 5), (7,)])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_the_reference(experts, filter_wise, shape):
    # a linear layer, a conv kernel (out, in, k), a bias
    base, *models = [t.reshape(-1)[: math.prod(shape)].view(shape) for t in (experts[0], *experts[1])]
    got = run("model_stock", base, models, filter_wise=filter_wise)
    torch.testing.assert_close(got.double(), ref.model_stock(base, models, filter_wise), rtol=0, atol=1e-6)


def test_model_stock_needs_two_experts_and_no_weights():
    with pytest.raises(RecipeError, match="'model_stock' merges at least 2 model"):
        recipe("model_stock", n=1)
    with pytest.raises(RecipeError, match="needs 'base_model'"):
        Recipe.from_mapping({"method": "model_stock", "models": ["a.pt", "b.pt"], "output": "o.pt"})
    with pytest.raises(RecipeError, match="does not use weights"):
        Recipe.from_mapping(
            {
                "method": "model_stock",
                "base_model": "base.pt",
                "models": [{"model": "a.pt", "weight": 2.0}, "b.pt"],
                "output": "o.pt",
            }
        )
    with pytest.raises(RecipeError, match="'filter_wise' must be true or false"):
        recipe("model_stock", parameters={"filter_wise": "yes"})


# --- breadcrumbs


def test_breadcrumbs_keeps_the_band_below_the_largest_entries():
    tau = torch.tensor([0.1, -0.5, 0.3, 0.05, -0.9, 0.2, 0.4, -0.7, 0.6, 0.8])
    # gamma 0.2: the 2 largest (-0.9, 0.8) dropped; density 0.5: the next 5 kept;
    # the 3 smallest (0.2, 0.1, 0.05) dropped
    kept = magnitude_band(tau, density=0.5, gamma=0.2)
    assert kept.tolist() == pytest.approx([0.0, -0.5, 0.3, 0.0, 0.0, 0.0, 0.4, -0.7, 0.6, 0.0])


def test_breadcrumbs_keeps_exactly_k_when_magnitudes_tie():
    tau = torch.tensor([0.5, -0.5] * 10)
    kept = magnitude_band(tau, density=0.3, gamma=0.1)
    assert int((kept != 0).sum()) == 6
    assert torch.equal(kept[kept != 0].abs(), torch.full((6,), 0.5))


def test_breadcrumbs_without_gamma_is_magnitude_trimming_and_one_entry_survives():
    tau = torch.tensor([3.0, -1.0, 2.0, 0.5])
    assert magnitude_band(tau, density=0.5, gamma=0.0).tolist() == [3.0, 0.0, 2.0, 0.0]
    # one-element tensor: k = max(1, round(0.1)) = 1 and no room for a dropped top
    assert magnitude_band(torch.tensor([2.0]), density=0.1, gamma=0.5).tolist() == [2.0]
    # density + gamma = 1: no lower tail dropped
    assert magnitude_band(tau, density=0.75, gamma=0.25).tolist() == [0.0, -1.0, 2.0, 0.5]


def test_breadcrumbs_merge_by_hand():
    base = torch.zeros(5)
    models = [torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), torch.tensor([-1.0, 0.0, 2.0, 0.0, 0.0])]
    # density 0.4, gamma 0.2 of 5 entries: the largest dropped, the next 2 kept.
    # expert 1 -> (0, 4, 3, 0, 0); expert 2 (magnitudes 1, 0, 2, 0, 0) -> (-1, 0, 0, 0, 0)
    # 0.5 * (1 * (0, 4, 3, 0, 0) + 2 * (-1, 0, 0, 0, 0))
    got = run("breadcrumbs", base, models, [1.0, 2.0], density=0.4, gamma=0.2, **{"lambda": 0.5})
    assert got.tolist() == [-1.0, 2.0, 1.5, 0.0, 0.0]


@pytest.mark.parametrize("density, gamma", [(0.9, 0.01), (0.5, 0.1), (0.2, 0.3), (0.05, 0.0)])
def test_breadcrumbs_matches_the_reference(experts, density, gamma):
    base, models = experts
    weights = [1.0, 0.5, 2.0]
    got = run("breadcrumbs", base, models, weights, density=density, gamma=gamma, **{"lambda": 0.7})
    want = ref.breadcrumbs(base, models, weights, 0.7, density, gamma)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_breadcrumbs_rejects_density_plus_gamma_above_one():
    with pytest.raises(RecipeError, match=r"parameters: density \+ gamma must not exceed 1"):
        recipe("breadcrumbs", parameters={"density": 0.95, "gamma": 0.1})
    # the default gamma (0.01) counts too
    with pytest.raises(RecipeError, match=r"overrides\[0\]\.parameters: density \+ gamma"):
        recipe("breadcrumbs", overrides=[{"pattern": "encoder.*", "parameters": {"density": 1.0}}])
    with pytest.raises(RecipeError, match="'gamma' must lie in \\[0, 1\\]"):
        recipe("breadcrumbs", parameters={"gamma": -0.1})
    with pytest.raises(RecipeError, match="'density' must lie in \\(0, 1\\]"):
        recipe("breadcrumbs", parameters={"density": 0.0})


def test_breadcrumbs_overrides_that_meet_on_a_tensor_are_refused_there():
    # each override is valid on top of the parameters; only together do they break the rule
    r = recipe(
        "breadcrumbs",
        parameters={"density": 0.5},
        overrides=[
            {"pattern": "encoder.*", "parameters": {"density": 0.8}},
            {"pattern": "*.weight", "parameters": {"gamma": 0.3}},
        ],
    )
    assert r.parameters_for("decoder.weight")["gamma"] == 0.3
    with pytest.raises(RecipeError, match="tensor 'encoder.weight'.*density 0.8 \\+ gamma 0.3"):
        r.parameters_for("encoder.weight")


# --- della


def test_della_keep_probabilities_follow_magnitude_rank_per_row():
    tau = torch.tensor([[0.1, -0.4, 0.3], [2.0, 1.0, -3.0]])
    # ranks (0 = smallest): [0, 2, 1] and [1, 0, 2]; k = 0.5 - 0.2 + 0.4 r / 2
    probs = magnitude_rank_keep_probabilities(tau, density=0.5, epsilon=0.2)
    torch.testing.assert_close(probs, torch.tensor([[0.3, 0.7, 0.5], [0.5, 0.3, 0.7]]))
    # a conv kernel (out, in, k): a row is one output channel, every other axis flattened
    conv = torch.arange(12.0).view(2, 2, 3)
    torch.testing.assert_close(
        magnitude_rank_keep_probabilities(conv, 0.5, 0.25), torch.linspace(0.25, 0.75, 6).repeat(2).view(2, 2, 3)
    )
    assert magnitude_rank_keep_probabilities(torch.tensor([4.0]), 0.6, 0.3).tolist() == pytest.approx([0.6])


def test_della_rescales_each_survivor_by_its_keep_probability():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(4, 16, generator=g)
    probs = magnitude_rank_keep_probabilities(tau, 0.4, 0.3)
    dropped = della_drop(tau, 0.4, 0.3, torch.Generator().manual_seed(5))
    # the mask is u < k with u drawn from the same generator
    u = torch.rand(tau.shape, generator=torch.Generator().manual_seed(5))
    survivors = u < probs
    assert torch.equal(dropped != 0, survivors)
    torch.testing.assert_close(dropped[survivors], (tau / probs)[survivors])


def test_della_expected_value_is_the_task_vector():
    # E[m tau / k] = tau: the mean over 4000 seeds is within 5 standard errors of tau
    tau = torch.tensor([[0.5, -1.0, 2.0, -0.25], [1.5, 0.75, -2.0, 0.1]])
    density, epsilon, draws = 0.4, 0.3, 4000
    total = torch.zeros_like(tau, dtype=torch.float64)
    for seed in range(draws):
        total += della_drop(tau, density, epsilon, torch.Generator().manual_seed(seed)).double()
    probs = magnitude_rank_keep_probabilities(tau, density, epsilon).double()
    stderr = tau.double().abs() * ((1 - probs) / probs / draws).sqrt()
    assert ((total / draws - tau.double()).abs() < 5 * stderr).all()


def test_della_keeps_large_entries_more_often():
    tau = torch.tensor([0.01, 0.1, 1.0, 10.0])
    kept = torch.zeros(4)
    for seed in range(2000):
        kept += (della_drop(tau, 0.5, 0.4, torch.Generator().manual_seed(seed)) != 0).float()
    # keep probabilities 0.1, 0.3667, 0.6333, 0.9
    torch.testing.assert_close(kept / 2000, torch.tensor([0.1, 11 / 30, 19 / 30, 0.9]), rtol=0, atol=0.04)


@pytest.mark.parametrize("weights", [[1, 1, 1], [2, 1, 0.5]])
def test_della_matches_the_reference(experts, weights):
    base, models = experts
    got = run("della", base, models, weights, name="enc.w", density=0.6, epsilon=0.2, seed=3, **{"lambda": 0.8})
    generators = [torch.Generator().manual_seed(tensor_seed(3, "enc.w", i)) for i in range(3)]
    uniforms = [torch.rand(base.shape, generator=g) for g in generators]
    want = ref.della(base, models, weights, 0.8, 0.6, 0.2, uniforms)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_della_with_full_density_is_ties_without_trimming(experts):
    base, models = experts
    got = run("della", base, models, density=1.0, epsilon=0.0)
    torch.testing.assert_close(got.double(), ref.ties(base, models, [1, 1, 1], 1.0, 1.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("density, epsilon", [(0.2, 0.2), (0.9, 0.15), (1.0, 0.1)])
def test_della_rejects_probabilities_outside_the_unit_interval(density, epsilon):
    with pytest.raises(RecipeError, match="keep probabilities density -/\\+ epsilon must lie in \\(0, 1\\]"):
        recipe("della", parameters={"density": density, "epsilon": epsilon})


def test_della_rejects_a_negative_epsilon():
    with pytest.raises(RecipeError, match="'epsilon' must lie in \\[0, 1\\]"):
        recipe("della", parameters={"epsilon": -0.1})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["model_stock", "breadcrumbs", "della"])
def test_half_precision_inputs_are_computed_in_float32(experts, dtype, method):
    base, models = experts
    got = run(method, base.to(dtype).float(), [m.to(dtype).float() for m in models])
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
