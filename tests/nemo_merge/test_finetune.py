"""Fine-tuning experts with NeMo: LLRD, STLR, LoRA (depthwise conv included), export and
trajectory snapshots, on the tiny FastConformer with a real Lightning ``Trainer.fit``,
real PEFT, and the ``nemo_merge.finetune`` script end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

pytest.importorskip("nemo.collections.asr")

from lightning.pytorch.callbacks import Callback  # noqa: E402
from nemo.collections.asr.models import ASRModel  # noqa: E402
from nemo.collections.asr.parts.submodules.causal_convs import CausalConv1D  # noqa: E402
from nemo.core.classes.common import UnsafeTargetError  # noqa: E402
from nemo.utils.trainer_utils import resolve_trainer_cfg as nemo_resolve_trainer_cfg  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

from merge_core import Recipe, merge  # noqa: E402
from merge_core.errors import TrainingConfigError  # noqa: E402
from merge_core.training.lora import Conv1dLora, lora_folded  # noqa: E402
from tests.checkpoint_helpers import read_weights  # noqa: E402
from tests.nemo_merge.conftest import cpu_trainer  # noqa: E402
from merge_core.training.stlr import SlantedTriangularLR, slanted_triangular  # noqa: E402
from nemo_merge.callbacks import (  # noqa: E402
    ExpertSetup,
    ExportBestExpert,
    ExportExpert,
    TrajectorySnapshots,
    resolve_trainer_cfg,
)
from nemo_merge.lora import lora_settings  # noqa: E402
from nemo_merge.optim import llrd_settings, param_group_summary  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
N_LAYERS = 3  # the tiny config's encoder.n_layers
STEPS = 4  # two epochs of the 8-utterance manifest in batches of 4
DECAY, LR_TOP, CUT_FRAC, RATIO = 0.8, 1e-3, 0.25, 8.0
DEPTHWISE = "encoder.layers.{}.conv.depthwise_conv.weight"


class LearningRateRecorder(Callback):
    """Every group's learning rate before each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[float]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append((trainer.global_step, [g["lr"] for g in trainer.optimizers[0].param_groups]))


def fit(base: Path, train_manifest: Path, root: Path, sections: dict, callbacks: list, seed: int = 0):
    """Restore ``base``, set ``sections`` (dotted keys: ``llrd``, ``lora``, ``optim.sched``, ...)
    in its config, and fit ``STEPS`` steps with ``callbacks``, as a user's own script would."""
    model = ASRModel.restore_from(str(base), map_location="cpu")
    trainer = cpu_trainer(STEPS, root, callbacks)
    model.set_trainer(trainer)  # NeMo takes the scheduler's max_steps from the trainer it was given
    with open_dict(model.cfg):
        for key, value in sections.items():
            OmegaConf.update(model.cfg, key, value, merge=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        train_ds = {**OmegaConf.to_container(model.cfg.train_ds), "manifest_filepath": str(train_manifest)}
        model.setup_training_data(train_ds)
        trainer.fit(model)
    return model, trainer


@pytest.fixture(scope="module")
def llrd_run(tmp_path_factory, tiny_nemo_base, nemo_finetune_manifests):
    """A full fine-tuning with LLRD (given to the callback, as for a model restored from a
    .nemo) and STLR (a model config entry), exported at the end."""
    root = tmp_path_factory.mktemp("llrd_run")
    recorder = LearningRateRecorder()
    sections = {"optim.lr": LR_TOP, "optim.sched": {"name": "SlantedTriangular", "cut_frac": CUT_FRAC, "ratio": RATIO}}
    export = root / "llrd_expert.nemo"
    callbacks = [ExpertSetup(llrd={"decay": DECAY}), recorder, ExportExpert(str(export))]
    model, trainer = fit(tiny_nemo_base, nemo_finetune_manifests[0], root, sections, callbacks)
    return SimpleNamespace(model=model, trainer=trainer, recorder=recorder, export=export)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_nemo_base, nemo_finetune_manifests):
    """A LoRA fine-tuning (default targets: attention, feed-forward, pointwise and depthwise
    convolutions), exported at the end, with snapshots every 2 steps and every epoch."""
    root = tmp_path_factory.mktemp("lora_run")
    sections = {"lora": {"r": 4}, "optim.lr": 1e-2, "optim.sched.warmup_steps": 0}
    export = root / "lora_expert.nemo"
    callbacks = [
        ExpertSetup(),
        ExportExpert(str(export)),
        TrajectorySnapshots(str(root / "by_step"), every_n_train_steps=2),
        TrajectorySnapshots(str(root / "by_epoch"), every_n_epochs=1),
    ]
    model, trainer = fit(tiny_nemo_base, nemo_finetune_manifests[0], root, sections, callbacks, seed=1)
    return SimpleNamespace(model=model, trainer=trainer, root=root, export=export)


def log_probs(model, signal: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.forward(input_signal=signal, input_signal_length=lengths)[0]


def audio() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 24000, generator=g) * 0.1, torch.tensor([24000, 19000])


# --- LLRD and STLR ---------------------------------------------------------------------


def test_llrd_groups_carry_the_paper_rates(llrd_run):
    groups = llrd_run.trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["layer 0", "layer 1", "layer 2", "rest"]
    for j in range(N_LAYERS):
        assert groups[j]["initial_lr"] == LR_TOP * DECAY ** (N_LAYERS - (j + 1))
    assert groups[-1]["initial_lr"] == groups[0]["initial_lr"] == LR_TOP * DECAY ** (N_LAYERS - 1)
    model = llrd_run.model
    names = {id(p): n for n, p in model.named_parameters()}
    rest = {".".join(names[id(p)].split(".")[:2]) for p in groups[-1]["params"]}
    assert rest == {"encoder.pre_encode", "decoder.decoder_layers"}
    assert all(names[id(p)].startswith(f"encoder.layers.{j}.") for j in range(N_LAYERS) for p in groups[j]["params"])
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    assert param_group_summary(llrd_run.trainer.optimizers[0])[2].startswith("layer 2: lr 0.001 ")
    assert model.cfg.llrd.decay == DECAY  # the callback's section is recorded in the model's config
    assert ASRModel.restore_from(str(llrd_run.export), map_location="cpu").cfg.llrd.decay == DECAY


def test_stlr_keeps_the_llrd_ratios_at_every_step(llrd_run):
    assert isinstance(llrd_run.trainer.lr_scheduler_configs[0].scheduler, SlantedTriangularLR)
    peaks = [g["initial_lr"] for g in llrd_run.trainer.optimizers[0].param_groups]
    steps = llrd_run.recorder.steps
    assert [s for s, _ in steps] == list(range(STEPS))
    multipliers = []
    for step, rates in steps:
        multiplier = slanted_triangular(step, STEPS, CUT_FRAC, RATIO)
        multipliers.append(multiplier)
        assert rates == pytest.approx([p * multiplier for p in peaks], rel=1e-12)
        ratios = [r / rates[N_LAYERS - 1] for r in rates]
        assert ratios == pytest.approx([DECAY**2, DECAY, 1.0, DECAY**2], rel=1e-12)
    assert multipliers[0] == 1 / RATIO and multipliers[1] == 1.0  # warm-up to the peak, then down


# --- LoRA ------------------------------------------------------------------------------


def test_lora_trains_only_lora_parameters_and_wraps_the_causal_depthwise_conv(lora_run, tiny_nemo_base):
    model = lora_run.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for j in range(N_LAYERS):
        depthwise = model.encoder.layers[j].conv.depthwise_conv
        assert isinstance(depthwise, Conv1dLora) and type(depthwise.get_base_layer()) is CausalConv1D
    base = read_weights(tiny_nemo_base)
    frozen = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if not p.requires_grad}
    plain = ASRModel.restore_from(str(tiny_nemo_base), map_location="cpu")
    assert set(frozen) == {n for n, _ in plain.named_parameters()}
    assert all(torch.equal(p, base[n]) for n, p in frozen.items())


def test_folded_lora_changes_the_depthwise_kernels_and_gives_the_lora_outputs(lora_run, tiny_nemo_base):
    model = lora_run.model
    signal, lengths = audio()
    with_lora = log_probs(model, signal, lengths)
    with lora_folded(model):
        folded = log_probs(model, signal, lengths)
    assert (folded - with_lora).abs().max() < 1e-5
    exported = ASRModel.restore_from(str(lora_run.export), map_location="cpu")
    assert (log_probs(exported, signal, lengths) - with_lora).abs().max() < 1e-5
    base, expert = read_weights(tiny_nemo_base), read_weights(lora_run.export)
    assert list(expert) == list(base) and all(expert[k].shape == base[k].shape for k in base)
    for j in range(N_LAYERS):
        assert not torch.equal(expert[DEPTHWISE.format(j)], base[DEPTHWISE.format(j)])


def test_exported_experts_merge_with_asr_merge(tmp_path, llrd_run, lora_run, tiny_nemo_base):
    recipe = tmp_path / "aode.yaml"
    output = tmp_path / "aode.nemo"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "average",
                "base_model": str(tiny_nemo_base),
                "models": [str(llrd_run.export), str(lora_run.export)],
                "output": str(output),
            }
        )
    )
    cli = str(Path(sys.executable).parent / "asr-merge")
    done = subprocess.run([cli, "merge", str(recipe), "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b, merged = read_weights(llrd_run.export), read_weights(lora_run.export), read_weights(output)
    name = DEPTHWISE.format(1)
    torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-6)
    restored = ASRModel.restore_from(str(output), map_location="cpu")
    assert torch.isfinite(log_probs(restored, *audio())).all()


# --- snapshots -------------------------------------------------------------------------


def test_trajectory_snapshots_at_the_interval_average_into_a_restorable_nemo(tmp_path, lora_run):
    by_step = sorted((lora_run.root / "by_step").iterdir())
    by_epoch = sorted((lora_run.root / "by_epoch").iterdir())
    assert [p.name for p in by_step] == ["step-00000002.safetensors", "step-00000004.safetensors"]
    assert [p.name for p in by_epoch] == ["epoch-0001.safetensors", "epoch-0002.safetensors"]
    expert = read_weights(lora_run.export)
    snapshots = [read_weights(p) for p in by_step]
    assert all(set(s) == set(expert) for s in snapshots)
    assert all(torch.equal(snapshots[-1][k], expert[k]) for k in expert)  # the last step is the export
    assert not torch.equal(snapshots[0][DEPTHWISE.format(0)], snapshots[1][DEPTHWISE.format(0)])

    output = tmp_path / "mast.nemo"
    recipe = {
        "method": "average",
        "base_model": str(lora_run.export),
        "models": [str(p) for p in by_step],
        "output": str(output),
    }
    merge(Recipe.from_mapping(recipe), progress=False)
    mast = ASRModel.restore_from(str(output), map_location="cpu")
    state = mast.state_dict()
    for name in (DEPTHWISE.format(2), "encoder.layers.0.self_attn.linear_q.weight"):
        torch.testing.assert_close(state[name], (snapshots[0][name] + snapshots[1][name]) / 2, rtol=0, atol=1e-6)
    assert torch.isfinite(log_probs(mast, *audio())).all()


class FakeModel:
    def __init__(self) -> None:
        self.saved = 0

    def save_to(self, path: str) -> None:
        self.saved += 1
        Path(path).write_text(str(self.saved))


def test_export_best_expert_exports_only_on_improvement(tmp_path):
    callback = ExportBestExpert(str(tmp_path / "best.nemo"), monitor="val_wer", mode="min")
    model = FakeModel()
    for wer in (0.9, 0.95, 0.8, 0.8):
        metrics = {"val_wer": torch.tensor(wer)}
        trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, callback_metrics=metrics)
        callback.on_validation_end(trainer, model)
    assert model.saved == 2 and (tmp_path / "best.nemo").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["best.nemo"]
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, callback_metrics={"val_loss": 1.0})
    with pytest.raises(TrainingConfigError, match="'val_wer' was not logged; logged: val_loss"):
        callback.on_validation_end(trainer, model)


# --- config entries --------------------------------------------------------------------


def test_callbacks_from_trainer_config_entries(tmp_path):
    entries = OmegaConf.create(
        {
            "max_steps": 3,
            "callbacks": [
                {"_target_": "nemo_merge.callbacks.ExpertSetup", "llrd": {"decay": 0.9}},
                {"_target_": "nemo_merge.callbacks.TrajectorySnapshots", "dirpath": str(tmp_path), "every_n_epochs": 2},
                {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor"},
            ],
        }
    )
    # NeMo 3.0 instantiates trainer.callbacks through an allow-list that refuses other packages
    with pytest.raises(UnsafeTargetError):
        nemo_resolve_trainer_cfg(entries)
    resolved = resolve_trainer_cfg(entries)
    names = [type(c).__name__ for c in resolved["callbacks"]]
    assert names == ["ExpertSetup", "TrajectorySnapshots", "LearningRateMonitor"]
    assert resolved["callbacks"][0].sections == {"llrd": {"decay": 0.9}}
    assert resolved["callbacks"][1].every_n_epochs == 2 and resolved["max_steps"] == 3
    with pytest.raises(UnsafeTargetError):  # everything else still goes through NeMo's allow-list
        resolve_trainer_cfg(OmegaConf.create({"callbacks": [{"_target_": "builtins.exec", "source": "1"}]}))


@pytest.mark.parametrize(
    "section, parse, message",
    [
        ({"lora": {"r": 4, "rank": 8}}, lora_settings, "unknown key lora.rank"),
        ({"lora": {"r": 4, "target_modules": ["depthwise_conv", 3]}}, lora_settings, "lora.target_modules"),
        ({"llrd": {"decay": 2.0}}, llrd_settings, "llrd.decay"),
        ({"llrd": {"decay": 0.9, "layer_pattern": "^encoder"}}, llrd_settings, "exactly one group"),
    ],
)
def test_bad_config_entries_are_refused_naming_the_key(section, parse, message):
    with pytest.raises(TrainingConfigError, match=message):
        parse(OmegaConf.create(section))


def test_nemo_default_lora_targets_include_the_depthwise_conv():
    settings = lora_settings(OmegaConf.create({"lora": {"r": 16}}))
    assert settings.scale_alpha == 32.0 and "depthwise_conv" in settings.target_modules
    assert llrd_settings(OmegaConf.create({})) is None and lora_settings(OmegaConf.create({})) is None


# --- the script ------------------------------------------------------------------------


def test_finetune_script_with_lora_ema_and_exp_manager(tmp_path, tiny_nemo_base, nemo_finetune_manifests):
    train, dev = nemo_finetune_manifests
    out = tmp_path / "run"
    done = subprocess.run(
        [
            # the config path relative to the working directory, as in the script's usage line
            sys.executable, "-m", "nemo_merge.finetune",
            "--config-path", os.path.relpath(REPO / "configs" / "nemo", tmp_path), "--config-name", "finetune_expert",
            f"output_dir={out}", f"init_from_nemo_model={tiny_nemo_base}",
            f"model.train_ds.manifest_filepath={train}", f"model.validation_ds.manifest_filepath={dev}",
            "model.train_ds.batch_size=4", "model.validation_ds.batch_size=8",
            "model.train_ds.num_workers=0", "model.validation_ds.num_workers=0",
            "model.train_ds.pin_memory=false", "model.validation_ds.pin_memory=false",
            "+model.lora.r=4", "model.optim.lr=0.01",
            "trainer.max_steps=2", "trainer.enable_progress_bar=false", "trainer.callbacks.3.every_n_train_steps=1",
            "exp_manager.ema.enable=true",
        ],
        capture_output=True, text=True, cwd=tmp_path,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "optimizer group layer 2: lr 0.01 " in log and "optimizer group layer 0: lr 0.0081 " in log
    snapshots = sorted(p.name for p in (out / "snapshots").iterdir())
    assert snapshots == ["step-00000001.safetensors", "step-00000002.safetensors"]
    base = read_weights(tiny_nemo_base)
    exp_manager_nemo = next((out / "expert").glob("*/checkpoints/expert.nemo"))
    for path in (out / "expert.nemo", out / "expert_best.nemo", exp_manager_nemo):
        expert = read_weights(path)
        assert list(expert) == list(base), path
        assert not torch.equal(expert[DEPTHWISE.format(0)], base[DEPTHWISE.format(0)]), path
    restored = ASRModel.restore_from(str(out / "expert.nemo"), map_location="cpu")
    assert restored.cfg.lora.r == 4 and restored.cfg.llrd.decay == 0.9


def test_model_overrides_amend_the_restored_network(tmp_path, tiny_nemo_base):
    from nemo_merge.finetune import restore_generalist

    cfg = OmegaConf.create({"init_from_nemo_model": str(tiny_nemo_base), "model_overrides": {"encoder": {"dropout_att": 0.07}}})
    model = restore_generalist(cfg, cpu_trainer(1, tmp_path))
    assert model.cfg.encoder.dropout_att == 0.07
    rates = {m.p for n, m in model.encoder.named_modules() if isinstance(m, torch.nn.Dropout) and "self_attn" in n}
    assert rates == {0.07}
    base = read_weights(tiny_nemo_base)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)  # the weights are the .nemo's
    with pytest.raises(TrainingConfigError, match="model_overrides needs init_from_nemo_model"):
        restore_generalist(OmegaConf.create({"init_from_pretrained_model": "x", "model_overrides": {}}), None)
