"""RegMean: Gram collection through forward hooks, the Gram files, and the merge's closed
form against numpy on a tiny real torch model of three experts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from merge_core import Recipe, merge
from merge_core.app.cli import main
from merge_core.errors import RecipeError, TensorMismatchError
from merge_core.grams import GramCollector, GramConfig, Grams, gram_path, linear_layers, read_record, write_grams

IN, HIDDEN, OUT = 4, 3, 2
WEIGHTS = [1.0, 2.0, 0.5]
PAD = 1e3  # what padded frames hold: counting one would show in every Gram


class Tiny(nn.Module):
    """A linear layer, a norm and a kernel-1 convolution (a CTC decoder's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Conv1d(HIDDEN, OUT, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(x)).transpose(1, 2))


def expert(seed: int) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # LayerNorm's weight and bias away from 1 and 0
    return model


def batches(seed: int, count: int = 3, size: int = 3, frames: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x [B, T, IN], lengths [B]) of one expert's domain: its own scale and offset, padding = PAD."""
    g = torch.Generator().manual_seed(100 + seed)
    out = []
    for _ in range(count):
        lengths = torch.randint(2, frames + 1, (size,), generator=g)
        lengths[0] = frames
        x = torch.randn(size, frames, IN, generator=g) * (1 + seed) + seed
        x[torch.arange(frames)[None, :] >= lengths[:, None]] = PAD
        out.append((x, lengths))
    return out


def collect(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> Grams:
    """Grams through the model's forward, lengths reported as a toolkit module would."""
    with GramCollector(linear_layers(model)) as collector, torch.no_grad():
        for x, lengths in data:
            collector.start_batch(x.shape[0])
            collector.report_lengths(x.shape[1], lengths)
            model(x)
    return collector.finish()


def real_rows(x: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
    return x[torch.arange(x.shape[1])[None, :] < lengths[:, None]].double().numpy()


def hand_grams(model: Tiny, data: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Each layer's mean x x^T over the real frames, by running the submodules by hand (no hook)."""
    with torch.no_grad():
        inputs = {
            "proj.weight": np.concatenate([real_rows(x, n) for x, n in data]),
            "head.weight": np.concatenate([real_rows(model.norm(model.proj(x)), n) for x, n in data]),
        }
    return {name: rows.T @ rows / len(rows) for name, rows in inputs.items()}


@pytest.fixture(scope="module")
def collected() -> list[dict]:
    """Three experts, each with its domain's batches and the Grams collected on them."""
    out = []
    for i in range(3):
        model, data = expert(i), batches(i)
        out.append({"model": model, "data": data, "collected": collect(model, data), "grams": hand_grams(model, data)})
    return out


@pytest.fixture
def experts(collected: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The experts saved as safetensors, each with its Gram file beside it."""
    monkeypatch.setenv("ASR_MERGE_CACHE", str(tmp_path / "cache"))  # digests cached here, not across runs
    manifest = tmp_path / "train.json"
    manifest.write_text('{"audio_filepath": "a.wav", "text": "a"}\n')
    out = []
    for i, c in enumerate(collected):
        path = tmp_path / f"expert{i}.safetensors"
        state = {k: v.contiguous() for k, v in c["model"].state_dict().items()}
        save_file(state, path)
        write_grams(GramConfig(manifest=manifest, model=path), c["collected"], path)
        grams = {k: v.copy() for k, v in c["grams"].items()}
        out.append({**c, "path": path, "state": {k: v.double().numpy() for k, v in state.items()}, "grams": grams})
    return out


def merged(experts: list[dict], tmp_path: Path, alpha: float, weights=WEIGHTS, **recipe) -> dict[str, np.ndarray]:
    out = tmp_path / f"merged-{alpha}.safetensors"
    models = [{"model": str(e["path"]), "weight": w} for e, w in zip(experts, weights)]
    merge(
        Recipe.from_mapping(
            {"method": "regmean", "models": models, "parameters": {"alpha": alpha}, "output": str(out), **recipe}
        ),
        progress=False,
    )
    return {k: v.double().numpy() for k, v in load_file(out).items()}


def closed_form(experts: list[dict], name: str, alpha: float, weights=WEIGHTS) -> np.ndarray:
    """W = ((sum_i w_i G~_i)^-1 sum_i w_i G~_i W_i^T)^T in numpy."""
    lhs, rhs = 0, 0
    for e, w in zip(experts, weights):
        g = e["grams"][name]
        reduced = alpha * g + (1 - alpha) * np.diag(np.diag(g))
        weight = e["state"][name].reshape(e["state"][name].shape[0], -1)
        lhs, rhs = lhs + w * reduced, rhs + w * reduced @ weight.T
    return np.linalg.solve(lhs, rhs).T.reshape(experts[0]["state"][name].shape)


def test_collected_grams_equal_the_hand_recomputation_without_padding(experts):
    for e in experts:
        got = e["collected"]
        assert got.batches == 3 and got.utterances == 9 and got.skipped == {} and got.not_run == []
        frames = sum(int(n.sum()) for _, n in e["data"])
        assert got.rows == {"proj.weight": frames, "head.weight": frames}
        for name, want in e["grams"].items():
            np.testing.assert_allclose(got.matrices[name].double().numpy(), want, rtol=1e-5, atol=1e-5)
        assert float(got.matrices["proj.weight"].max()) < PAD  # a padded row would put PAD**2 on the diagonal


def test_time_major_inputs_and_relative_lengths(experts):
    """A [T, B, C] input (SpeechBrain's feed-forward layers) masked by relative lengths."""
    data = experts[0]["data"]
    layer = nn.Linear(IN, 1)
    with GramCollector({"layer.weight": layer}) as collector:
        for x, lengths in data:
            collector.start_batch(x.shape[0], relative=lengths / x.shape[1])
            layer(x.transpose(0, 1))
    got = collector.finish()
    np.testing.assert_allclose(
        got.matrices["layer.weight"].double().numpy(), experts[0]["grams"]["proj.weight"], rtol=1e-5, atol=1e-5
    )


def test_an_input_waits_for_its_lengths_and_is_skipped_without_them():
    layer = nn.Linear(IN, 1)
    x = torch.ones(2, 5, IN)
    x[1, 3:] = PAD
    with GramCollector({"layer.weight": layer}) as collector:
        collector.start_batch(2)
        layer(x)  # before the toolkit reports this axis' lengths (NeMo's subsampling output)
        collector.report_lengths(5, torch.tensor([5, 3]))
        collector.start_batch(2)
        layer(x)  # never reported
    got = collector.finish()
    assert got.rows["layer.weight"] == 8 and torch.equal(got.matrices["layer.weight"], torch.ones(IN, IN))
    assert "no lengths were reported for its time axis of 5 frames (1 call(s))" in got.skipped["layer.weight"]


def test_merge_is_the_closed_form_and_minimises_the_regression(experts, tmp_path):
    alpha = 1.0
    got = merged(experts, tmp_path, alpha)
    for name in ("proj.weight", "head.weight"):
        want = closed_form(experts, name, alpha)
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)
        # d/dW sum_i w_i ||X_i W^T - X_i W_i^T||^2 / N_i = 2 sum_i w_i (W - W_i) G_i
        w = got[name].reshape(got[name].shape[0], -1)
        gradient = sum(
            wi * (w - e["state"][name].reshape(w.shape)) @ e["grams"][name] for e, wi in zip(experts, WEIGHTS)
        )
        scale = sum(
            wi * np.abs(e["state"][name].reshape(w.shape) @ e["grams"][name]).max() for e, wi in zip(experts, WEIGHTS)
        )
        assert np.abs(gradient).max() < 1e-5 * scale
    average = sum(wi * e["state"]["proj.weight"] for e, wi in zip(experts, WEIGHTS)) / sum(WEIGHTS)
    assert np.abs(got["proj.weight"] - average).max() > 0.1  # not the average in disguise


def test_alpha_zero_weighs_each_input_feature_on_its_own(experts, tmp_path):
    got = merged(experts, tmp_path, 0.0)
    for name in ("proj.weight", "head.weight"):
        shape = experts[0]["state"][name].shape
        num = sum(
            wi * e["state"][name].reshape(shape[0], -1) * np.diag(e["grams"][name]) for e, wi in zip(experts, WEIGHTS)
        )
        den = sum(wi * np.diag(e["grams"][name]) for e, wi in zip(experts, WEIGHTS))
        np.testing.assert_allclose(got[name], (num / den).reshape(shape), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["head.weight"], closed_form(experts, "head.weight", 0.0), rtol=1e-5, atol=1e-6)


def test_tensors_without_a_gram_are_the_weighted_average(experts, tmp_path):
    got = merged(experts, tmp_path, 0.5)
    for name in ("proj.bias", "norm.weight", "norm.bias", "head.bias"):
        want = sum(wi * e["state"][name] for e, wi in zip(experts, WEIGHTS)) / sum(WEIGHTS)
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7)


def test_the_base_as_a_member_brings_its_own_gram(experts, tmp_path):
    base, others = experts[0], experts[1:]
    got = merged(
        others, tmp_path, 0.5, weights=[1.0, 1.0], base_model=str(base["path"]), include_base=True, base_weight=3.0
    )
    want = closed_form([base, *others], "proj.weight", 0.5, weights=[3.0, 1.0, 1.0])
    np.testing.assert_allclose(got["proj.weight"], want, rtol=1e-5, atol=1e-6)


def test_an_input_feature_no_expert_saw_keeps_the_average(experts, tmp_path):
    """A singular sum of Grams: the ridge toward the average (a plain inverse fails)."""
    for e in experts:
        path = gram_path(e["path"])
        record = read_record(path)
        grams = load_file(path)
        grams["proj.weight"][:, 0] = 0
        grams["proj.weight"][0, :] = 0
        save_file(grams, path, metadata={"regmean": json.dumps(record)})
        e["grams"]["proj.weight"][:, 0] = e["grams"]["proj.weight"][0, :] = 0
    got = merged(experts, tmp_path, 1.0)["proj.weight"]
    average = sum(wi * e["state"]["proj.weight"] for e, wi in zip(experts, WEIGHTS)) / sum(WEIGHTS)
    np.testing.assert_allclose(got[:, 0], average[:, 0], rtol=1e-6, atol=1e-9)
    # the other inputs still get RegMean's solution on the Grams restricted to them
    reduced = [
        {
            **e,
            "grams": {"proj.weight": e["grams"]["proj.weight"][1:, 1:]},
            "state": {"proj.weight": e["state"]["proj.weight"][:, 1:]},
        }
        for e in experts
    ]
    np.testing.assert_allclose(got[:, 1:], closed_form(reduced, "proj.weight", 1.0), rtol=1e-4, atol=1e-5)


def test_a_missing_gram_file_is_named_before_any_checkpoint_is_read(experts, tmp_path):
    gram_path(experts[1]["path"]).unlink()
    experts[1]["path"].write_bytes(b"not a checkpoint")  # opening it would be a CheckpointError
    with pytest.raises(RecipeError) as e:
        merged(experts, tmp_path, 0.5)
    message = str(e.value)
    assert str(experts[1]["path"]) in message and str(gram_path(experts[1]["path"])) in message
    assert "asr-merge grams" in message and str(experts[0]["path"]) + " has none" not in message


def test_a_gram_of_another_shape_is_refused_naming_both(experts, tmp_path):
    model = expert(1)
    model.proj = nn.Linear(IN + 1, HIDDEN)  # another architecture's Gram beside expert 1
    config = GramConfig(manifest=tmp_path / "train.json", model=experts[1]["path"])
    write_grams(config, collect(model, [(torch.randn(2, 3, IN + 1), torch.tensor([3, 2]))]), experts[1]["path"])
    with pytest.raises(TensorMismatchError) as e:
        merged(experts[1:], tmp_path, 0.5, weights=[1.0, 1.0])
    assert "'proj.weight' has shape (5, 5)" in str(e.value) and "has shape (3, 4)" in str(e.value)


def test_a_gram_collected_from_other_weights_is_refused(experts, tmp_path):
    state = load_file(experts[2]["path"])
    state["proj.bias"] += 1
    save_file(state, experts[2]["path"])
    with pytest.raises(RecipeError, match="collected from other weights than .*expert2.safetensors"):
        merged(experts, tmp_path, 0.5)


def test_the_record_says_what_was_collected(experts):
    record = read_record(gram_path(experts[0]["path"]))
    assert record["batches"] == 3 and record["utterances"] == 9 and record["format"] == 1
    assert record["rows"] == experts[0]["collected"].rows
    assert len(record["weights_sha256"]) == 64 and len(record["manifest_sha256"]) == 64


def test_the_merge_records_its_gram_files(experts, tmp_path):
    models = [str(e["path"]) for e in experts]
    recipe = {"method": "regmean", "models": models, "output": str(tmp_path / "m.safetensors")}
    grams = merge(Recipe.from_mapping(recipe), progress=False).provenance["tensors"]["grams"]
    assert [g["path"] for g in grams] == [str(gram_path(m)) for m in models]
    assert grams[0]["sha256"] == hashlib.sha256(gram_path(models[0]).read_bytes()).hexdigest()
    assert grams[0]["batches"] == 3 and grams[0]["manifest"] == str((tmp_path / "train.json").resolve())


def test_alpha_outside_the_unit_interval_is_refused():
    with pytest.raises(RecipeError, match="'alpha' must lie in \\[0, 1\\], got 1.5"):
        Recipe.from_mapping({"method": "regmean", "models": ["a", "b"], "parameters": {"alpha": 1.5}, "output": "o.pt"})


def test_asr_merge_methods_lists_regmean(capsys):
    assert main(["methods"]) == 0
    assert "regmean          alpha=0.1" in capsys.readouterr().out.splitlines()


def test_a_search_does_not_draw_regmean():
    from merge_core.recipes.search import SearchSpace

    with pytest.raises(RecipeError, match="'regmean' merges from Gram files"):
        SearchSpace.from_mapping({"methods": ["average", "regmean"]})


@pytest.mark.parametrize(
    "keys, message",
    [
        ({}, "exactly one of 'model'"),
        ({"model": "{expert}", "pretrained_name": "nvidia/x"}, "exactly one of 'model'"),
        ({"pretrained_name": "nvidia/x"}, "set 'output'"),
        ({"model": "{expert}", "batch_size": 0}, "'batch_size' must be an integer >= 1, got 0"),
        ({"model": "{expert}", "hparams": "h.yaml"}, "unknown Gram config key(s) ['hparams']"),
        ({"model": "missing.nemo"}, "'model': missing.nemo does not exist"),
    ],
)
def test_bad_gram_configs_name_the_key(tmp_path, keys, message):
    expert = tmp_path / "expert.nemo"
    expert.touch()
    raw = {"manifest": "train.json", **{k: v.format(expert=expert) for k, v in keys.items() if isinstance(v, str)}}
    raw.update({k: v for k, v in keys.items() if not isinstance(v, str)})
    with pytest.raises(RecipeError) as e:
        GramConfig.from_mapping(raw)
    assert message in str(e.value)


def test_batches_and_max_utterances_take_the_first_utterances(tmp_path):
    config = GramConfig(manifest=tmp_path / "m.json", batch_size=3, batches=2)
    assert config.choose(list(range(10))) == [0, 1, 2, 3, 4, 5]
    assert GramConfig(manifest=tmp_path / "m.json", batch_size=3, batches=2, max_utterances=4).choose(
        list(range(10))
    ) == [0, 1, 2, 3]
