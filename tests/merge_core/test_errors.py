"""Bad input gets an error naming the file, tensor or key, and nothing is written."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from merge_core import MergeError, Recipe, merge
from merge_core.errors import CheckpointError, NonFiniteError, RecipeError, TensorMismatchError
from tests.merge_core.conftest import make_state, save_kind


@pytest.fixture
def files(tmp_path):
    base = make_state(0)
    paths = [save_kind(base, tmp_path, "base", "safetensors")]
    paths += [save_kind(make_state(i, base), tmp_path, f"e{i}", "safetensors") for i in (1, 2)]
    return tmp_path, base, paths


def recipe(base, models, out, **fields):
    return Recipe.from_mapping(
        {"method": "average", "base_model": str(base), "models": [str(m) for m in models], "output": str(out), **fields}
    )


def assert_nothing_written(folder: Path, out: Path):
    assert not out.exists()
    assert [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []


def test_missing_file_is_named(files):
    folder, _, (base, e1, _) = files
    out = folder / "out.safetensors"
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        merge(recipe(base, [e1, folder / "nope.safetensors"], out), progress=False)
    assert_nothing_written(folder, out)


def test_truncated_safetensors_is_named(files):
    folder, _, (base, e1, e2) = files
    e2.write_bytes(e2.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{e2.name}: unreadable or corrupt"):
        merge(recipe(base, [e1, e2], folder / "out.safetensors"), progress=False)


def test_corrupt_torch_file_is_named(files):
    folder, _, (base, e1, _) = files
    bad = folder / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive at all")
    with pytest.raises(CheckpointError, match="bad.pt: unreadable or corrupt torch checkpoint"):
        merge(recipe(base, [e1, bad], folder / "out.safetensors"), progress=False)


class NotATensor:
    pass


def test_pickle_that_is_not_weights_only_is_refused(files, tmp_path):
    folder, base_state, (base, e1, _) = files
    evil = folder / "evil.pt"
    torch.save({**base_state, "payload": NotATensor()}, evil)
    out = folder / "out.safetensors"
    with pytest.raises(CheckpointError, match=r"evil.pt: not a weights-only checkpoint \(it holds a .*NotATensor"):
        merge(recipe(base, [e1, evil], out), progress=False)
    assert_nothing_written(folder, out)


def test_state_dict_entry_that_is_not_a_tensor(files):
    folder, base_state, (base, e1, _) = files
    odd = folder / "odd.pt"
    torch.save({**base_state, "step": 3}, odd)
    with pytest.raises(CheckpointError, match="odd.pt: entry 'step' is a int, not a tensor"):
        merge(recipe(base, [e1, odd], folder / "out.safetensors"), progress=False)


def test_key_set_mismatch_lists_missing_and_extra(files):
    folder, base_state, (base, e1, _) = files
    state = dict(base_state)
    del state["encoder.scale"]
    state["encoder.extra"] = torch.zeros(2)
    other = save_kind(state, folder, "other", "safetensors")
    with pytest.raises(TensorMismatchError, match=r"other.safetensors: tensor names differ .*missing 'encoder.scale'; extra 'encoder.extra'"):
        merge(recipe(base, [e1, other], folder / "out.safetensors"), progress=False)


def test_shape_mismatch_names_tensor_and_both_files(files):
    folder, base_state, (base, e1, _) = files
    state = {**base_state, "encoder.layers.0.self_attn.linear_q.bias": torch.zeros(9)}
    other = save_kind(state, folder, "other", "safetensors")
    with pytest.raises(TensorMismatchError, match=r"other.safetensors: tensor 'encoder.layers.0.self_attn.linear_q.bias' has shape \(9,\), .*base.safetensors has \(8,\)"):
        merge(recipe(base, [e1, other], folder / "out.safetensors"), progress=False)


def test_dtype_kind_mismatch(files):
    folder, base_state, (base, e1, _) = files
    state = {**base_state, "encoder.scale": torch.ones(1, dtype=torch.int32)}
    other = save_kind(state, folder, "other", "safetensors")
    with pytest.raises(TensorMismatchError, match="'encoder.scale' is torch.int32.*different kind"):
        merge(recipe(base, [e1, other], folder / "out.safetensors"), progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_is_refused_and_an_old_output_survives(files, bad):
    folder, base_state, (base, e1, _) = files
    state = {k: v.clone() for k, v in base_state.items()}
    state["decoder.decoder_layers.0.bias"][2] = bad  # written last: the run fails late
    other = save_kind(state, folder, "other", "safetensors")
    out = folder / "out.safetensors"
    out.write_bytes(b"previous result")
    with pytest.raises(NonFiniteError, match=r"other.safetensors: tensor 'decoder.decoder_layers.0.bias' holds 1 NaN/Inf"):
        merge(recipe(base, [e1, other], out), progress=False)
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []
    merge(recipe(base, [e1, other], out, allow_nonfinite=True), progress=False)
    assert out.read_bytes() != b"previous result"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"models": [{"model": "a", "weight": -1}]}, r"models\[0\].weight must not be negative"),
        ({"models": [{"model": "a", "weight": 0}, {"model": "b", "weight": 0}]}, "weights sum to zero"),
        ({"method": "ties", "parameters": {"density": 0}}, r"'density' must lie in \(0, 1\]"),
        ({"method": "ties", "parameters": {"density": 1.5}}, r"'density' must lie in \(0, 1\]"),
        ({"method": "slerp", "base_model": None, "models": ["a", "b", "c"]}, "merges 2 model"),
        ({"method": "mean"}, "unknown merge method 'mean'; known methods: average, breadcrumbs, dare_linear"),
        ({"method": "average", "parameters": {"density": 0.5}}, "method 'average' takes no parameter"),
        ({"modles": []}, r"unknown recipe key\(s\) \['modles'\]"),
        ({"method": "ties", "base_model": None}, "needs 'base_model'"),
        ({"method": "ties", "include_base": True}, "include_base is not meaningful"),
        ({"method": "ties", "parameters": {"trim_scope": "layer"}}, "trim_scope' must be one of tensor, model"),
        ({"output": "base.pt"}, "is also an input"),
        ({"shard_size": "lots"}, "shard_size must be a byte count"),
        ({"method": "extreme", "models": [{"model": "a", "weight": 2}]}, "does not use weights"),
    ],
)
def test_recipe_errors(fields, message):
    raw = {"method": "average", "base_model": "base.pt", "models": ["a", "b"], "output": "out.safetensors", **fields}
    with pytest.raises(RecipeError, match=message):
        Recipe.from_mapping(raw)


def test_every_error_is_a_merge_error():
    assert all(issubclass(e, MergeError) for e in (RecipeError, CheckpointError, TensorMismatchError, NonFiniteError))


def test_shard_size_on_a_single_file_output(files):
    folder, _, (base, e1, e2) = files
    with pytest.raises(CheckpointError, match="shard_size needs a folder"):
        merge(recipe(base, [e1, e2], folder / "out.safetensors", shard_size="1KiB"), progress=False)
    assert_nothing_written(folder, folder / "out.safetensors")


def test_pickle_error_is_not_an_unpickling_traceback(files):
    # a plain pickle (not torch's zip format) of a non-tensor object
    folder, _, (base, e1, _) = files
    raw = folder / "raw.bin"
    raw.write_bytes(pickle.dumps({"a": NotATensor()}))
    with pytest.raises(CheckpointError, match="raw.bin"):
        merge(recipe(base, [e1, raw], folder / "out.safetensors"), progress=False)


def test_torch_output_with_shards_is_refused(files):
    folder, _, (base, e1, e2) = files
    with pytest.raises(CheckpointError, match="shard_size applies to safetensors"):
        merge(recipe(base, [e1, e2], folder / "out.pt", shard_size=1024), progress=False)
    assert_nothing_written(folder, folder / "out.pt")


def test_sharded_index_with_missing_shard(files):
    folder, base_state, (base, e1, _) = files
    sharded = save_kind(base_state, folder, "sh", "sharded")
    (sharded / "b.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard 'b.safetensors' is missing"):
        merge(recipe(base, [e1, sharded], folder / "out.safetensors"), progress=False)

