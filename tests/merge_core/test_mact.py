"""The MAcT launcher's toolkit-free half: the recipe, the sampling, finished runs reused,
and the merge of the runs' best models (each toolkit's runs: tests/*/test_mact.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.errors import RecipeError
from merge_core.recipes.mact import RANGES, MactRecipe, load_mact_recipe, run_mact


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.safetensors"
    save_file({"w": torch.zeros(3, 2), "b": torch.ones(2)}, path)
    return path


def recipe(base: Path, tmp_path: Path, **changes) -> dict:
    return {"toolkit": "nemo", "base_model": str(base), "runs": 3, "seed": 1, "train": {"config": "x.yaml"},
            "work_dir": str(tmp_path / "runs"), "output": str(tmp_path / "mact.safetensors"), **changes}


def test_sampling_is_seeded_and_inside_the_ranges(base: Path, tmp_path: Path) -> None:
    first = MactRecipe.from_mapping(recipe(base, tmp_path)).sampled()
    assert first == MactRecipe.from_mapping(recipe(base, tmp_path)).sampled()
    assert first != MactRecipe.from_mapping(recipe(base, tmp_path, seed=2)).sampled()
    assert len(set(first)) == 3 and all(dict(h).keys() == RANGES.keys() for h in first)
    assert all(RANGES[k][0] <= v <= RANGES[k][1] for h in first for k, v in h)
    narrow = MactRecipe.from_mapping(recipe(base, tmp_path, ranges={"lr_scale": [2, 2]})).sampled()
    assert narrow == [(("lr_scale", 2.0),)] * 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"toolkit": "kaldi"}, "toolkit"),
        ({"runs": 0}, "runs"),
        ({"merge": "ties"}, "merge"),
        ({"merge": "greedy_soup"}, "dev"),
        ({"ranges": {"momentum": [0, 1]}}, "ranges.momentum"),
        ({"ranges": {"dropout": [0.2, 0.1]}}, "ranges.dropout"),
        ({"base_model": "missing.nemo"}, "base_model"),
        ({"epochs": 3}, "epochs"),
        ({"train": None}, "train"),
    ],
)
def test_bad_recipes_name_the_key(base: Path, tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        MactRecipe.from_mapping(recipe(base, tmp_path, **changes))


def test_recipe_file_errors_name_the_file(base: Path, tmp_path: Path) -> None:
    path = tmp_path / "mact.yaml"
    path.write_text(json.dumps(recipe(base, tmp_path, runs=-1)))
    with pytest.raises(RecipeError, match="mact.yaml"):
        load_mact_recipe(path)
    assert load_mact_recipe(path, ["runs=2"]).runs == 2


def test_runs_are_averaged_and_finished_runs_are_not_trained_again(base: Path, tmp_path: Path) -> None:
    trained = []

    def train_run(mact: MactRecipe, index: int, hyper, run_dir: Path) -> Path:
        """Each run's 'best model': the base plus its learning-rate factor."""
        trained.append(index)
        best = run_dir / "best.safetensors"
        save_file({k: v + dict(hyper)["lr_scale"] for k, v in load_file(mact.base_model).items()}, best)
        return best

    mact = MactRecipe.from_mapping(recipe(base, tmp_path))
    run_mact(mact, train_run, progress=False)
    scales = [dict(h)["lr_scale"] for h in mact.sampled()]
    merged = load_file(mact.output)
    assert torch.allclose(merged["w"], torch.full((3, 2), sum(scales) / 3))
    runs = json.loads((mact.work_dir / "runs.json").read_text())
    assert [r["hyper"]["lr_scale"] for r in runs] == scales and trained == [0, 1, 2]
    run_mact(mact, train_run, progress=False)
    assert trained == [0, 1, 2]  # every run found finished
    (mact.work_dir / "run-1" / "best.safetensors").unlink()
    run_mact(MactRecipe.from_mapping(recipe(base, tmp_path, runs=4)), train_run, progress=False)
    assert trained == [0, 1, 2, 1, 3]  # the run whose best model is gone, and the new one


def test_a_run_without_its_best_model_fails_naming_it(base: Path, tmp_path: Path) -> None:
    mact = MactRecipe.from_mapping(recipe(base, tmp_path, runs=1))
    with pytest.raises(RuntimeError, match="run-0"):
        run_mact(mact, lambda m, i, h, d: d / "never-written.nemo", progress=False)
    assert not Path(mact.output).exists()


@pytest.mark.parametrize("toolkit", ["nemo", "speechbrain"])
def test_example_recipes_validate(toolkit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)  # their paths are relative to the repository, as the README runs them
    mact = load_mact_recipe(repo / "configs" / "recipes" / f"example_mact_{toolkit}.yaml")
    assert mact.toolkit == toolkit and mact.runs == 4 and len(mact.sampled()) == 4
