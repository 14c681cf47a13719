"""L-MAM in a NeMo fine-tuning: ``model.lmam`` merges a tiny BERT's attention into the
tiny FastConformer through a real Lightning ``Trainer.fit``, exported folded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("nemo.collections.asr")
transformers = pytest.importorskip("transformers")

from nemo.collections.asr.models import ASRModel  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from merge_core.errors import TrainingConfigError  # noqa: E402
from merge_core.attention.lmam import has_lmam, lmam_lambdas  # noqa: E402
from nemo_merge.callbacks import ExpertSetup, ExportExpert, TrajectorySnapshots  # noqa: E402
from nemo_merge.lmam import apply_lmam_from_config, lmam_settings  # noqa: E402
from tests.checkpoint_helpers import read_weights  # noqa: E402
from tests.nemo_merge.test_finetune import audio, fit, log_probs  # noqa: E402

D_MODEL, N_LAYERS, INIT = 96, 3, 0.3  # the tiny FastConformer's width and depth
Q = "encoder.layers.{}.self_attn.linear_q.weight"


@pytest.fixture(scope="module")
def bert_source(tmp_path_factory):
    """A tiny random BERT of the encoder's width and depth, with random biases (fresh
    models start them at 0, which would hide the bias interpolation)."""
    torch.manual_seed(5)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=64
    )
    state = {k: v + 0.1 * torch.randn_like(v) if k.endswith(".bias") else v.contiguous() for k, v in transformers.BertModel(config).state_dict().items()}
    path = tmp_path_factory.mktemp("bert") / "model.safetensors"
    save_file(state, path)
    return path, state


@pytest.fixture(scope="module")
def lmam_run(tmp_path_factory, tiny_nemo_base, nemo_finetune_manifests, bert_source):
    root = tmp_path_factory.mktemp("lmam_run")
    sections = {
        "lmam": {"source_model": str(bert_source[0]), "layers": [1, 2], "init_lambda": INIT},
        "optim.lr": 5e-2,
        "optim.sched.warmup_steps": 0,
    }
    export = root / "lmam_expert.nemo"
    callbacks = [ExpertSetup(), ExportExpert(str(export)), TrajectorySnapshots(str(root / "snapshots"), every_n_train_steps=2)]
    model, trainer = fit(tiny_nemo_base, nemo_finetune_manifests[0], root, sections, callbacks, seed=2)
    return SimpleNamespace(model=model, root=root, export=export)


def _interpolation(model, layer: int):
    return model.encoder.layers[layer].self_attn.linear_q.parametrizations.weight


def test_lmam_lambdas_train_inside_the_unit_interval_on_the_chosen_layers(lmam_run):
    lambdas = lmam_lambdas(lmam_run.model)
    assert sorted(lambdas) == sorted(
        f"encoder.layers.{i}.self_attn.linear_{p}.{w}" for i in (1, 2) for p in "qkv" for w in ("weight", "bias")
    )
    assert all(0.0 < lam < 1.0 for lam in lambdas.values())
    assert any(abs(lam - INIT) > 1e-3 for lam in lambdas.values())  # the optimizer moved them
    assert not torch.nn.utils.parametrize.is_parametrized(lmam_run.model.encoder.layers[0].self_attn.linear_q)


def test_exported_lmam_expert_is_plain_and_gives_the_parametrized_outputs(lmam_run, tiny_nemo_base, bert_source):
    model = lmam_run.model
    signal, lengths = audio()
    trained = log_probs(model, signal, lengths)
    exported = ASRModel.restore_from(str(lmam_run.export), map_location="cpu")
    assert (log_probs(exported, signal, lengths) - trained).abs().max() < 1e-5
    expert, base = read_weights(lmam_run.export), read_weights(tiny_nemo_base)
    assert set(expert) == set(base)
    # Eq. 3 on a folded tensor: lambda W_s + (1 - lambda) W_t, W_t the still-parametrized original
    p = _interpolation(model, 2)
    lam = float(torch.sigmoid(p[0].logit.detach()))
    source = bert_source[1]["encoder.layer.2.attention.self.query.weight"]
    assert torch.allclose(expert[Q.format(2)], lam * source + (1 - lam) * p.original.detach(), atol=1e-6)
    # exporting left training's state alone: still parametrized, W_t not overwritten by W_i
    assert has_lmam(model) and not torch.allclose(p.original, expert[Q.format(2)])
    snapshots = sorted((lmam_run.root / "snapshots").iterdir())
    assert [s.name for s in snapshots] == ["step-00000002.safetensors", "step-00000004.safetensors"]
    assert set(read_weights(snapshots[-1])) == set(base)
    assert torch.equal(read_weights(snapshots[-1])[Q.format(2)], expert[Q.format(2)])


def test_lmam_is_refused_with_lora_and_bad_sections_name_the_key(tiny_nemo_base, bert_source):
    model = ASRModel.restore_from(str(tiny_nemo_base), map_location="cpu")
    with pytest.raises(TrainingConfigError, match="cannot be combined"):
        OmegaConf.set_struct(model.cfg, False)
        model.cfg.lmam = {"source_model": str(bert_source[0])}
        model.cfg.lora = {"r": 4}
        apply_lmam_from_config(model)
    for section, message in (
        ({"init_lambda": 0.5}, "source_model"),
        ({"source_model": "x", "init_lambda": 1.0}, "init_lambda"),
        ({"source_model": "x", "layer": [1]}, "unknown key"),
        ({"source_model": "x", "layers": [-1]}, "lmam.layers"),
    ):
        with pytest.raises(TrainingConfigError, match=message):
            lmam_settings(OmegaConf.create({"lmam": section}))
