"""The recipe format and the ``asr-merge merge RECIPE key=value`` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_core import load_recipe
from merge_core.checkpoint.safetensors_io import read_provenance
from merge_core.errors import RecipeError
from tests.merge_core.conftest import make_state, save_kind

ASR_MERGE = str(Path(sys.executable).parent / "asr-merge")


@pytest.fixture
def recipe_file(tmp_path):
    base = make_state(0)
    paths = [save_kind(s, tmp_path, n, "safetensors") for n, s in [("base", base), ("a", make_state(1, base)), ("b", make_state(2, base))]]
    text = f"""
method: ties
base_model: {paths[0]}
models:
  - model: {paths[1]}
    weight: 1.0
  - {{model: {paths[2]}, weight: 2.0}}
parameters: {{density: 0.5, lambda: 1.0}}
exclude: ["decoder.*"]
output: {tmp_path / "merged.safetensors"}
"""
    f = tmp_path / "recipe.yaml"
    f.write_text(text)
    return f


def test_overrides_reach_parameters_and_list_entries(recipe_file):
    r = load_recipe(recipe_file, ["parameters.density=0.3", "models.1.weight=0.5", "include_base=false"])
    assert r.parameters["density"] == 0.3 and r.models[1].weight == 0.5


def test_overrides_patterns_and_defaults(recipe_file):
    r = load_recipe(recipe_file, ["overrides=[{pattern: 'encoder.*', parameters: {lambda: 0.5}}]"])
    assert r.parameters_for("encoder.layers.0.x")["lambda"] == 0.5
    assert r.parameters_for("decoder.x") == {"lambda": 1.0, "density": 0.5, "trim_scope": "tensor"}
    assert not r.selects("decoder.decoder_layers.0.weight") and r.selects("encoder.scale")


def test_bad_override_names_it(recipe_file):
    with pytest.raises(RecipeError, match="override 'density' is not of the form key=value"):
        load_recipe(recipe_file, ["density"])
    with pytest.raises(RecipeError, match=r"recipe.yaml: parameter 'density' must lie in \(0, 1\]"):
        load_recipe(recipe_file, ["parameters.density=2"])


def test_models_as_plain_paths(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("method: average\nmodels: [a.pt, b.pt]\noutput: o.safetensors\n")
    assert [m.weight for m in load_recipe(f).models] == [1.0, 1.0]


def test_cli_merges_with_overrides(recipe_file, tmp_path):
    out = tmp_path / "cli.safetensors"
    done = subprocess.run([ASR_MERGE, "merge", str(recipe_file), f"output={out}", "parameters.density=0.25", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "tensors merged by ties" in done.stdout
    record = read_provenance(out)
    assert record["parameters"]["density"] == 0.25 and record["recipe"]["exclude"] == ["decoder.*"]
    merged, base = load_file(out), load_file(tmp_path / "base.safetensors")
    assert torch.equal(merged["decoder.decoder_layers.0.weight"], base["decoder.decoder_layers.0.weight"])
    assert not torch.equal(merged["encoder.layers.0.self_attn.linear_q.weight"], base["encoder.layers.0.self_attn.linear_q.weight"])


def test_cli_reports_errors_without_traceback(recipe_file):
    done = subprocess.run([ASR_MERGE, "merge", str(recipe_file), "method=soup"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "asr-merge: error:" in done.stderr and "unknown merge method 'soup'" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_lists_methods():
    done = subprocess.run([ASR_MERGE, "methods"], capture_output=True, text=True)
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.splitlines()] == [
        "average", "breadcrumbs", "dare_linear", "dare_ties", "della", "extreme", "iso_c", "iso_cts", "model_stock",
        "regmean", "slerp", "task_arithmetic", "ties", "tsv", "mam", "greedy_soup", "search"
    ]


def test_hash_inputs_off_records_sizes_only(recipe_file, tmp_path):
    from merge_core import merge

    result = merge(load_recipe(recipe_file, ["hash_inputs=false", f"output={tmp_path / 'nohash.safetensors'}"]), progress=False)
    files = [f for i in result.provenance["inputs"] for f in i["files"]]
    assert files and all(f["sha256"] is None and f["bytes"] > 0 for f in files)
    assert result.provenance["recipe"]["hash_inputs"] is False
