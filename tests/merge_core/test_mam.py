"""MAM across architectures (Sundar et al.): name maps, layer choice by similarity, L-MAM."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.checkpoint.safetensors_io import read_provenance
from merge_core.app.cli import main
from merge_core.errors import RecipeError, TensorMismatchError, TrainingConfigError
from merge_core.attention.lmam import LmamSettings, apply_lmam, apply_lmam_from_checkpoint, fold_lmam, lmam_folded, lmam_lambdas
from merge_core.recipes.mam import MamRecipe, run_mam
from merge_core.attention.name_map import BUILTIN_MAPS, map_tensors
from merge_core.attention.similarity import euclidean, rank_layers, sliced_wasserstein, top_k_layers

transformers = pytest.importorskip("transformers")

LAYERS, HIDDEN = 2, 32
_SMALL = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64)
_AUDIO = dict(
    conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
    num_conv_pos_embedding_groups=2, mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0,
    activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
)


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(vocab_size=50, **_SMALL)).eval()


def tiny_hubert(ctc: bool = True) -> torch.nn.Module:
    torch.manual_seed(1)
    config = transformers.HubertConfig(vocab_size=10, **_SMALL, **_AUDIO)
    return (transformers.HubertForCTC(config) if ctc else transformers.HubertModel(config)).eval()


def _save(model: torch.nn.Module, path, seed: int) -> dict[str, torch.Tensor]:
    """Save with every bias made random: fresh models start them all at 0, which would
    make source and target biases equal and their interpolation invisible."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v + torch.randn(v.shape, generator=g) if k.endswith(".bias") else v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path)
    return state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """BertModel (keys without prefix) as source, HubertForCTC (``hubert.`` prefix) as target."""
    folder = tmp_path_factory.mktemp("mam")
    source = _save(tiny_bert(), folder / "bert.safetensors", 2)
    target = _save(tiny_hubert(), folder / "hubert.safetensors", 3)
    return folder, source, target


def _mam(checkpoints, tmp_path, **keys) -> dict[str, torch.Tensor]:
    folder, _, _ = checkpoints
    raw = {
        "method": "mam",
        "target_model": str(folder / "hubert.safetensors"),
        "source_model": str(folder / "bert.safetensors"),
        "name_map": "bert_to_hubert",
        "output": str(tmp_path / "merged.safetensors"),
        "hash_inputs": False,
        **keys,
    }
    run_mam(MamRecipe.from_mapping(raw))
    return load_file(tmp_path / "merged.safetensors")


def _mapped(*layers: int) -> set[str]:
    return {f"hubert.encoder.layers.{i}.attention.{p}_proj.{w}" for i in layers for p in "qkv" for w in ("weight", "bias")}


def _changed(merged: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> set[str]:
    assert merged.keys() == target.keys()
    return {k for k in target if not torch.equal(merged[k], target[k])}


def test_lambda_zero_reproduces_the_target_bit_for_bit(checkpoints, tmp_path):
    merged = _mam(checkpoints, tmp_path, parameters={"lambda": 0.0})
    assert _changed(merged, checkpoints[2]) == set()


def test_lambda_one_copies_the_source_into_only_the_mapped_tensors(checkpoints, tmp_path):
    _, source, target = checkpoints
    merged = _mam(checkpoints, tmp_path, parameters={"lambda": 1.0})
    assert _changed(merged, target) == _mapped(0, 1)
    for i in range(LAYERS):
        for p, bert in (("q", "query"), ("k", "key"), ("v", "value")):
            assert torch.equal(merged[f"hubert.encoder.layers.{i}.attention.{p}_proj.weight"], source[f"encoder.layer.{i}.attention.self.{bert}.weight"])


def test_interpolation_follows_eq1_and_provenance_names_the_pairs(checkpoints, tmp_path):
    _, source, target = checkpoints
    merged = _mam(checkpoints, tmp_path, parameters={"lambda": 0.25})
    name = "hubert.encoder.layers.1.attention.k_proj.bias"
    expected = 0.25 * source["encoder.layer.1.attention.self.key.bias"] + 0.75 * target[name]
    torch.testing.assert_close(merged[name], expected)
    pairs = read_provenance(tmp_path / "merged.safetensors")["tensors"]["pairs"]
    assert pairs[name] == {"source": "encoder.layer.1.attention.self.key.bias", "layer": 1, "lambda": 0.25}


def test_layer_subset_and_per_layer_lambdas_change_only_those_layers(checkpoints, tmp_path):
    target = checkpoints[2]
    assert _changed(_mam(checkpoints, tmp_path, layers=[1], parameters={"lambda": 0.5}), target) == _mapped(1)
    assert _changed(_mam(checkpoints, tmp_path, parameters={"lambda": {0: 0.3}}), target) == _mapped(0)
    assert _changed(_mam(checkpoints, tmp_path, parameters={"lambda": [0.0, 0.7]}), target) == _mapped(1)


def test_noise_baselines_are_seeded_and_differ_from_the_source(checkpoints, tmp_path):
    target = checkpoints[2]
    name = "hubert.encoder.layers.0.attention.q_proj.weight"
    first = _mam(checkpoints, tmp_path, parameters={"lambda": 1.0, "baseline": "noise_target", "seed": 3})[name]
    again = _mam(checkpoints, tmp_path, parameters={"lambda": 1.0, "baseline": "noise_target", "seed": 3})[name]
    assert torch.equal(first, again) and not torch.equal(first, target[name])
    torch.testing.assert_close(first.std(), target[name].std(), rtol=0.1, atol=0.0)
    source_noise = _mam(checkpoints, tmp_path, parameters={"lambda": 1.0, "baseline": "noise_source"})
    assert _changed(source_noise, target) == _mapped(0, 1)


def test_shape_mismatch_names_both_tensors(checkpoints, tmp_path):
    folder, source, _ = checkpoints
    bad = dict(source, **{"encoder.layer.1.attention.self.value.weight": torch.zeros(HIDDEN, HIDDEN + 1)})
    save_file(bad, folder / "bad_bert.safetensors")
    with pytest.raises(TensorMismatchError, match=r"'encoder\.layer\.1\.attention\.self\.value\.weight'.*'hubert\.encoder\.layers\.1\.attention\.v_proj\.weight'"):
        _mam(checkpoints, tmp_path, source_model=str(folder / "bad_bert.safetensors"))
    assert not (tmp_path / "merged.safetensors").exists()


def test_bad_recipes_name_the_key(checkpoints, tmp_path):
    with pytest.raises(RecipeError, match="lambda.*must lie in \\[0, 1\\]"):
        _mam(checkpoints, tmp_path, parameters={"lambda": 1.5})
    with pytest.raises(RecipeError, match="unknown name_map 'gpt'"):
        _mam(checkpoints, tmp_path, name_map="gpt")
    with pytest.raises(RecipeError, match=r"layer\(s\) \[5\]"):
        _mam(checkpoints, tmp_path, layers=[5])
    with pytest.raises(RecipeError, match="lists 3 values"):
        _mam(checkpoints, tmp_path, parameters={"lambda": [0.1, 0.2, 0.3]})


def test_cli_dispatches_mam_recipes(checkpoints, tmp_path):
    folder = checkpoints[0]
    recipe = tmp_path / "mam.yaml"
    recipe.write_text(
        f"method: mam\ntarget_model: {folder / 'hubert.safetensors'}\nsource_model: {folder / 'bert.safetensors'}\n"
        f"name_map: bert_to_hubert\nparameters: {{lambda: 1.0}}\noutput: {tmp_path / 'cli.safetensors'}\n"
    )
    assert main(["merge", str(recipe), "layers=[0]", "-q"]) == 0
    assert _changed(load_file(tmp_path / "cli.safetensors"), checkpoints[2]) == _mapped(0)
    assert main(["merge", str(recipe), "parameters.baseline=gaussian"]) == 2


def test_user_and_nemo_name_maps():
    bert = [f"bert.encoder.layer.{i}.attention.self.{n}.{w}" for i in range(2) for n in ("query", "key", "value") for w in ("weight", "bias")]
    nemo = [f"encoder.layers.{i}.self_attn.linear_{p}.{w}" for i in range(2) for p in "qkv" for w in ("weight", "bias")]
    pairs = map_tensors(BUILTIN_MAPS["bert_to_nemo_conformer"], bert, nemo + ["encoder.layers.0.conv.x"], "bert", "nemo")
    assert {p.target for p in pairs} == set(nemo) and {p.source for p in pairs} == set(bert)
    user = {"enc.{i}.q": "blocks.{i}.attn.q"}
    assert [(p.source, p.target, p.layer) for p in map_tensors(user, ["enc.3.q"], ["m.blocks.3.attn.q"], "s", "t")] == [("enc.3.q", "m.blocks.3.attn.q", 3)]
    with pytest.raises(TensorMismatchError, match=r"'m\.blocks\.4\.attn\.q' maps to 'enc\.4\.q'"):
        map_tensors(user, ["enc.3.q"], ["m.blocks.4.attn.q"], "s", "t")


def test_swd_ranking_is_seeded_and_puts_an_identical_layer_first():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, 8, generator=g)
    b = torch.randn(4, 16, 8, generator=g) * torch.tensor([3.0, 1.5, 1.0, 2.0]).view(4, 1, 1)
    b[2] = a[2]
    assert torch.equal(sliced_wasserstein(a, b, seed=7), sliced_wasserstein(a, b, seed=7))
    assert sliced_wasserstein(a, b, seed=7)[2] == 0.0
    assert rank_layers(a, b, "swd", seed=7)[0] == 2 and rank_layers(a, b, "euclidean")[0] == 2
    assert rank_layers(a, b, "swd", seed=7) == rank_layers(a, b, "swd", seed=7)
    assert top_k_layers(a, b, 2, "swd", seed=1) == sorted(rank_layers(a, b, "swd", seed=1)[:2])
    assert euclidean(a, b)[2] == 0.0
    with pytest.raises(TensorMismatchError, match=r"\(4, 16, 8\) and \(4, 16, 7\)"):
        sliced_wasserstein(a, b[..., :7])


def _audio() -> torch.Tensor:
    return torch.randn(2, 400, generator=torch.Generator().manual_seed(5))


def test_lmam_lambdas_get_gradients_and_stay_in_the_unit_interval():
    model = tiny_hubert(ctc=False).train()
    logits = apply_lmam(model, tiny_bert().state_dict(), "bert_to_hubert", layers=[1], init_lambda=0.9)
    assert list(logits) == [1] and len(lmam_lambdas(model)) == 6
    optimizer = torch.optim.SGD(model.parameters(), lr=50.0)  # big steps push lambda hard against 1
    for _ in range(3):
        optimizer.zero_grad()
        model(_audio()).last_hidden_state.pow(2).mean().backward()
        assert logits[1].grad is not None and logits[1].grad.abs() > 0
        optimizer.step()
    assert all(0.0 <= lam <= 1.0 for lam in lmam_lambdas(model).values())
    assert model.encoder.layers[1].attention.q_proj.parametrizations.weight.original.requires_grad
    with pytest.raises(TrainingConfigError, match="init_lambda"):
        apply_lmam(tiny_hubert(ctc=False), tiny_bert().state_dict(), "bert_to_hubert", init_lambda=1.0)


def test_folded_lmam_matches_the_parametrized_model_and_keeps_the_keys():
    model = tiny_hubert(ctc=False)
    original_keys = list(model.state_dict())
    apply_lmam(model, tiny_bert().state_dict(), "bert_to_hubert", init_lambda=0.3)
    with torch.no_grad():
        parametrized = model(_audio()).last_hidden_state
        folded = fold_lmam(model)(_audio()).last_hidden_state
    assert list(model.state_dict()) == original_keys
    assert (parametrized - folded).abs().max() < 1e-5
    fresh = tiny_hubert(ctc=False)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (fresh(_audio()).last_hidden_state - parametrized).abs().max() < 1e-5


def test_lmam_folded_block_exports_plain_weights_and_training_resumes_bit_for_bit():
    model = tiny_hubert(ctc=False).train()
    apply_lmam(model, tiny_bert().state_dict(), "bert_to_hubert", init_lambda=0.4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(_audio()).last_hidden_state.pow(2).mean().backward()
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = model.encoder.layers[0].attention.q_proj
    original = q.parametrizations.weight.original
    with torch.no_grad():
        expected = q.weight.clone()  # W_i = lambda W_s + (1 - lambda) W_t
    with lmam_folded(model):
        plain = model.state_dict()
        assert list(plain) == list(tiny_hubert(ctc=False).state_dict())
        assert torch.equal(plain["encoder.layers.0.attention.q_proj.weight"], expected)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    # the optimizer still holds the very tensors the model trains
    assert q.parametrizations.weight.original is original
    assert any(p is original for group in optimizer.param_groups for p in group["params"])


def test_lmam_settings_validate_and_read_only_mapped_source_tensors(checkpoints):
    folder, source, _ = checkpoints
    settings = LmamSettings.from_mapping({"source_model": str(folder / "bert.safetensors"), "layers": [1]}, "bert_to_hubert")
    model = tiny_hubert()
    logits = apply_lmam_from_checkpoint(model, settings)
    assert list(logits) == [1] and abs(next(iter(lmam_lambdas(model).values())) - 0.1) < 1e-6
    buffer = model.hubert.encoder.layers[1].attention.k_proj.parametrizations.bias[0].source
    assert torch.equal(buffer, source["encoder.layer.1.attention.self.key.bias"])
    with pytest.raises(TrainingConfigError, match="name_map"):
        LmamSettings.from_mapping({"source_model": "x"})
    with pytest.raises(RecipeError, match="unknown name_map"):
        LmamSettings.from_mapping({"source_model": "x", "name_map": "bert_to_whisper"})
