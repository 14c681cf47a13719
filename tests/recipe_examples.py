"""The example recipes under ``configs/recipes/`` run as shipped through ``asr-merge merge`` on
the test fixtures' checkpoints (inputs and output given as ``key=value``), and each output
tensor held against the equation the recipe documents."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from merge_core import Recipe, load_recipe
from merge_core.app.cli import main
from tests.checkpoint_helpers import read_weights

REPO = Path(__file__).resolve().parents[1]

# (theta_0, [theta_1..n]) -> the tensor a recipe documents
Equation = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]


def merge_example(name: str, base: Path, experts: Sequence[Path], output: Path) -> Recipe:
    """``asr-merge merge configs/recipes/<name>.yaml`` on these checkpoints; the recipe as run."""
    recipe = REPO / "configs" / "recipes" / f"{name}.yaml"
    overrides = [f"base_model={base}", *(f"models.{i}={e}" for i, e in enumerate(experts)), f"output={output}"]
    assert main(["merge", str(recipe), *overrides, "-q"]) == 0
    return load_recipe(recipe, overrides)


def is_qkv(name: str) -> bool:
    """An attention query, key or value projection, named without the recipes' patterns:
    NeMo's ``self_attn.linear_{q,k,v}.{weight,bias}``, SpeechBrain's ``mha_layer`` packed
    ``in_proj_{weight,bias}``."""
    parts = name.split(".")
    nemo = "self_attn" in parts and parts[-2] in ("linear_q", "linear_k", "linear_v")
    return nemo or ("mha_layer" in parts and parts[-1].startswith("in_proj_"))


def check_tensors(output: Path, base: Path, experts: Sequence[Path], attention: Equation, rest: Equation,
                  copied: Callable[[str], bool] = lambda name: False) -> int:
    """Hold every tensor of ``output`` against its equation: ``attention`` for the Q, K, V
    projections, ``rest`` for every other floating-point tensor, the base's bytes for integer
    ones and ``copied`` names. Returns how many Q, K, V tensors differ from what ``rest``
    would have made of them (0 would mean the recipe's attention part did nothing)."""
    got, theta_0 = read_weights(output), read_weights(base)
    thetas = [read_weights(e) for e in experts]
    assert got.keys() == theta_0.keys()
    distinct = 0
    for name, tensor in got.items():
        if not tensor.is_floating_point() or copied(name):
            assert torch.equal(tensor, theta_0[name]), name
            continue
        inputs = (theta_0[name], [t[name] for t in thetas])
        equation = attention if is_qkv(name) else rest
        torch.testing.assert_close(tensor, equation(*inputs).to(tensor.dtype), rtol=0, atol=1e-6, msg=name)
        # exactly: a key's bias barely moves (softmax ignores what it adds to every score)
        distinct += is_qkv(name) and not torch.equal(attention(*inputs), rest(*inputs))
    return distinct


def task_arithmetic(lam: float) -> Equation:
    """theta_0 + lambda sum_i tau_i, tau_i = theta_i - theta_0 (unit weights)."""
    return lambda theta_0, thetas: theta_0 + lam * sum(t - theta_0 for t in thetas)


def average(theta_0: torch.Tensor, thetas: list[torch.Tensor]) -> torch.Tensor:
    """(1/n) sum_i theta_i."""
    return sum(thetas) / len(thetas)


def base(theta_0: torch.Tensor, thetas: list[torch.Tensor]) -> torch.Tensor:
    """theta_0: the tensor is the base's."""
    return theta_0
