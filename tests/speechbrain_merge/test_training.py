"""MergeableBrain on real SpeechBrain runs: LLRD, STLR, LoRA, snapshots, expert export,
and LLRD over a tiny random Whisper loaded through SpeechBrain's wrapper."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("speechbrain")

from peft.tuners.tuners_utils import BaseTunerLayer

from merge_core import Recipe, merge
from merge_core.errors import TrainingConfigError
from merge_core.training.lora import Conv1dLora, lora_folded
from speechbrain_merge.brain import MergeableBrain
from speechbrain_merge.recipes.train_ctc import CTCBrain, csv_dataset
from merge_core.training.llrd import LLRDSettings, llrd_param_groups
from speechbrain_merge.training import SlantedTriangularSchedule

from .conftest import checkpoints, write_tiny_whisper

LAYER = r"^Transformer\.encoder\.layers\.(\d+)\."
LORA_TARGETS = r"Transformer\.encoder\.layers\.\d+\.(convolution_module\.(bottleneck\.0|conv|after_conv\.2)|ffn_module1\.1\.ffn\.0)|ctc_lin\.w"
DECAY, LR = 0.5, 1e-3
STEPS = 2  # 8 utterances, batch 4, one epoch


class RecordingBrain(CTCBrain):
    """The recipe's Brain (a MergeableBrain), recording each group's rate after every step."""

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        super().on_fit_batch_end(batch, outputs, loss, should_step)
        self.rates.append([g["lr"] for g in self.optimizer.param_groups])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sb_hparams, sb_generalist) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("sb_lora")
    hparams = sb_hparams(
        output, tokenizer_folder=str(sb_generalist.output_folder / "tokenizer"), number_of_epochs=1, lr=LR
    )
    base = torch.load(sb_generalist.last / "model.ckpt")
    hparams["model"].load_state_dict(base)
    hparams.update(
        llrd={"decay": DECAY, "layer_pattern": LAYER},
        stlr=SlantedTriangularSchedule(max_steps=STEPS, cut_frac=0.5, ratio=4.0),
        lora={"r": 4, "target_modules": LORA_TARGETS},
        export_path=str(output / "expert"),
        export_recoverables=sorted(p.stem for p in sb_generalist.last.glob("*.ckpt")),
        snapshot_every_n_steps=1,
        snapshot_dir=str(output / "snapshots"),
    )
    brain = RecordingBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts={"device": "cpu", "noprogressbar": True},
        checkpointer=hparams["checkpointer"],
    )
    brain.rates = []
    brain.tokenizer = hparams["tokenizer"].sp
    frozen_before = {n: p.detach().clone() for n, p in brain.modules.named_parameters()}
    brain.fit(
        hparams["epoch_counter"],
        csv_dataset(hparams["train_csv"], hparams, brain.tokenizer),
        csv_dataset(hparams["valid_csv"], hparams, brain.tokenizer),
        train_loader_kwargs={"batch_size": 4, "shuffle": False},
        valid_loader_kwargs={"batch_size": 4},
    )
    return {"brain": brain, "hparams": hparams, "output": output, "base": base, "before": frozen_before}


def test_llrd_groups_carry_exact_rates(lora_run):
    groups = lora_run["brain"].optimizer.param_groups
    peaks = {g["name"]: g["initial_lr"] for g in groups}
    assert peaks == {"layer 0": LR * DECAY, "layer 1": LR, "rest": LR * DECAY}


def test_stlr_keeps_the_ratios_at_every_step(lora_run):
    brain = lora_run["brain"]
    peaks = [g["initial_lr"] for g in brain.optimizer.param_groups]
    assert len(brain.rates) == STEPS
    for step, rates in enumerate(brain.rates, start=1):
        multiplier = rates[0] / peaks[0]
        assert multiplier == pytest.approx([1.0, 0.25][step - 1])  # up at the cut, 1/ratio at T
        assert rates == pytest.approx([p * multiplier for p in peaks], rel=1e-12)


def test_lora_trains_only_lora_and_covers_depthwise_pointwise_and_linear(lora_run):
    modules = lora_run["brain"].modules
    trainable = [n for n, p in modules.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layer = modules.Transformer.encoder.layers[0]
    depthwise, pointwise = layer.convolution_module.conv, layer.convolution_module.bottleneck[0]
    assert (
        isinstance(depthwise, Conv1dLora)
        and depthwise.get_base_layer().groups == depthwise.get_base_layer().in_channels > 1
    )
    assert isinstance(pointwise, Conv1dLora) and pointwise.get_base_layer().kernel_size == (1,)
    assert isinstance(layer.ffn_module1[1].ffn[0], BaseTunerLayer) and isinstance(modules.ctc_lin.w, BaseTunerLayer)
    for name, param in modules.named_parameters():
        if not param.requires_grad and name in lora_run["before"]:
            assert torch.equal(param, lora_run["before"][name]), name
    # B starts at zero: a non-zero B means the LoRA parameters were trained
    assert any(p.abs().sum() > 0 for n, p in modules.named_parameters() if ".lora_B." in n)


def test_folded_model_gives_the_lora_models_outputs(lora_run):
    brain = lora_run["brain"]
    brain.modules.eval()
    feats = torch.randn(2, 50, 160)
    lengths = torch.ones(2)
    with torch.no_grad():
        lora_out = brain.modules.Transformer.encode(feats, lengths)
        with lora_folded(brain.modules):
            folded_out = brain.modules.Transformer.encode(feats, lengths)
    assert (lora_out - folded_out).abs().max() < 1e-5


def test_exported_expert_has_the_base_keys_and_merges(lora_run, sb_generalist, tmp_path):
    (expert,) = checkpoints(Path(lora_run["hparams"]["export_path"]))
    exported = torch.load(expert / "model.ckpt")
    assert list(exported) == list(lora_run["base"])
    assert not (expert / "stlr.ckpt").exists()
    out = tmp_path / "save" / "CKPT+merged"
    members = [str(sb_generalist.last), str(expert)]
    merge(
        Recipe.from_mapping({"method": "average", "models": members, "output": str(out), "base_model": members[0]}),
        progress=False,
    )
    merged = torch.load(out / "model.ckpt")
    name = next(k for k in merged if "convolution_module.conv.weight" in k)
    assert torch.allclose(merged[name], (exported[name] + lora_run["base"][name]) / 2, atol=1e-6)


def test_snapshots_are_written_at_the_interval(lora_run):
    from safetensors.torch import load_file

    snapshots = sorted((lora_run["output"] / "snapshots").iterdir())
    assert [p.name for p in snapshots] == ["step-00000001.safetensors", "step-00000002.safetensors"]
    (expert,) = checkpoints(Path(lora_run["hparams"]["export_path"]))
    exported = torch.load(expert / "model.ckpt", weights_only=True)
    snapshot = load_file(snapshots[-1])
    # named like the CKPT+ folder's tensors: the model recoverable, LoRA folded; the
    # normalizer's statistics (its own save hook) are not weights
    assert set(snapshot) == {f"model.{k}" for k in exported}
    assert all(torch.equal(snapshot[f"model.{k}"], v) for k, v in exported.items())  # the last step is the export


def test_one_stack_as_a_mapping_equals_the_plain_pattern(lora_run):
    model = torch.nn.ModuleDict(
        {"enc": torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)]), "out": torch.nn.Linear(2, 1)}
    )
    ours = llrd_param_groups(model, {"": r"^enc\.(\d+)\."}, 0.7, 0.1)
    core = llrd_param_groups(model, r"^enc\.(\d+)\.", 0.7, 0.1)
    assert [(g["name"], g["lr"], g["params"]) for g in ours] == [(g["name"], g["lr"], g["params"]) for g in core]
    expected = [("layer 0", 0.1 * 0.7**2), ("layer 1", 0.1 * 0.7), ("layer 2", 0.1), ("rest", 0.1 * 0.7**2)]
    assert [(g["name"], pytest.approx(g["lr"])) for g in core] == expected


def test_stlr_resumes_at_the_saved_step(tmp_path):
    def schedule_on_fresh_optimizer() -> tuple[SlantedTriangularSchedule, torch.optim.Optimizer]:
        params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
        optimizer = torch.optim.SGD([{"params": params[:1], "lr": 1.0}, {"params": params[1:], "lr": 0.5}])
        schedule = SlantedTriangularSchedule(max_steps=10, cut_frac=0.2, ratio=8.0)
        schedule.attach(optimizer)
        return schedule, optimizer

    schedule, optimizer = schedule_on_fresh_optimizer()
    for _ in range(3):
        optimizer.step()
        schedule.step()
    schedule.save(tmp_path / "stlr.ckpt")
    resumed, resumed_optimizer = schedule_on_fresh_optimizer()
    resumed.load(tmp_path / "stlr.ckpt")
    assert [g["lr"] for g in resumed_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"decay": 0.8, "layer_pattern": LAYER, "lr": 1}, "llrd.lr"),
        ({"decay": 0.8}, "llrd.layer_pattern"),
        ({"decay": 1.5, "layer_pattern": LAYER}, "llrd.decay"),
    ],
)
def test_bad_llrd_sections_name_the_key(section, key):
    with pytest.raises(TrainingConfigError, match=key):
        LLRDSettings.from_mapping(section)


def test_whisper_llrd_decays_encoder_and_decoder_from_their_own_tops(tmp_path):
    from hyperpyyaml import load_hyperpyyaml

    hub = write_tiny_whisper(tmp_path)
    config = Path(__file__).resolve().parents[2] / "configs" / "speechbrain" / "whisper_finetune.yaml"
    with open(config, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, {"output_folder": str(tmp_path / "out"), "whisper_hub": str(hub)})
    brain = MergeableBrain(
        modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams, run_opts={"device": "cpu"}
    )
    brain.init_optimizers()
    lr, decay = hparams["lr"], hparams["llrd"]["decay"]
    peaks = {g["name"]: g["initial_lr"] for g in brain.optimizer.param_groups}
    assert peaks == {
        "encoder layer 0": lr * decay,
        "encoder layer 1": lr,
        "decoder layer 0": lr * decay,
        "decoder layer 1": lr,
        "rest": lr * decay,
    }
    grouped = sum(len(g["params"]) for g in brain.optimizer.param_groups)
    assert grouped == sum(1 for p in brain.modules.parameters() if p.requires_grad)
    encoder_0 = next(g for g in brain.optimizer.param_groups if g["name"] == "encoder layer 0")["params"]
    assert any(p is brain.modules.whisper.model.encoder.layers[0].fc1.weight for p in encoder_0)


def test_whisper_lora_folds_to_the_same_outputs(tmp_path):
    from hyperpyyaml import load_hyperpyyaml

    hub = write_tiny_whisper(tmp_path)
    config = Path(__file__).resolve().parents[2] / "configs" / "speechbrain" / "whisper_finetune.yaml"
    with open(config, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, {"output_folder": str(tmp_path / "out"), "whisper_hub": str(hub)})
    hparams["lora"] = {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
    brain = MergeableBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams)
    brain.apply_lora()
    whisper = brain.modules.whisper
    for name, param in whisper.named_parameters():
        if ".lora_B." in name:  # B starts at zero: give the update a value to fold
            torch.nn.init.normal_(param, std=0.1)
    whisper.eval()
    wav, tokens = torch.randn(1, 8000), torch.tensor([[whisper.model.config.decoder_start_token_id]])
    with torch.no_grad():
        lora_out = whisper(wav, tokens)[1]
        with lora_folded(brain.modules):
            folded_out = whisper(wav, tokens)[1]
            assert not any(".lora_" in k for k in whisper.state_dict())
    assert (lora_out - folded_out).abs().max() < 1e-5


def test_mast_averages_snapshots_into_a_ckpt_folder(lora_run, tmp_path):
    from safetensors.torch import load_file

    from merge_core import Recipe, merge

    (expert,) = checkpoints(Path(lora_run["hparams"]["export_path"]))
    snapshots = sorted((lora_run["output"] / "snapshots").iterdir())
    out = tmp_path / "CKPT+mast"
    merge(Recipe.from_mapping({
        "method": "average", "base_model": str(expert), "models": [str(s) for s in snapshots],
        "output": str(out), "hash_inputs": False,
    }), progress=False)
    merged, first, last = torch.load(out / "model.ckpt"), load_file(snapshots[0]), load_file(snapshots[1])
    assert set(merged) == {k.removeprefix("model.") for k in first}
    assert all(torch.allclose(merged[k.removeprefix("model.")], (first[k] + last[k]) / 2, atol=1e-6) for k in first)
    assert (out / "normalizer.ckpt").read_bytes() == (expert / "normalizer.ckpt").read_bytes()


class RateUsingBrain(CTCBrain):
    """The recipe's Brain, recording each group's rate as each optimizer step is about to use it."""

    def on_fit_batch_start(self, batch, should_step):
        super().on_fit_batch_start(batch, should_step)
        self.used.append([g["lr"] for g in self.optimizer.param_groups])


def test_a_recipe_run_counts_stlr_steps_keeps_newbob_out_and_exports_the_model(tmp_path, sb_hparams, sb_generalist):
    from merge_core.training.stlr import slanted_triangular

    hparams = sb_hparams(tmp_path / "run", tokenizer_folder=str(sb_generalist.output_folder / "tokenizer"),
                         number_of_epochs=2, lr=LR)
    hparams.update(llrd={"decay": DECAY, "layer_pattern": LAYER},
                   stlr=SlantedTriangularSchedule(cut_frac=0.5, ratio=4.0), export_path=str(tmp_path / "expert"))
    brain = RateUsingBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                           run_opts={"device": "cpu", "noprogressbar": True}, checkpointer=hparams["checkpointer"])
    brain.used, brain.tokenizer = [], hparams["tokenizer"].sp
    brain.fit(hparams["epoch_counter"], csv_dataset(hparams["train_csv"], hparams, brain.tokenizer),
              csv_dataset(hparams["valid_csv"], hparams, brain.tokenizer),
              train_loader_kwargs={"batch_size": 4, "shuffle": False}, valid_loader_kwargs={"batch_size": 4})
    steps = 2 * STEPS
    assert hparams["stlr"].max_steps == steps  # counted from the loader and the epoch counter
    peaks = [g["initial_lr"] for g in brain.optimizer.param_groups]
    # every step, the second epoch's first included, uses STLR's rate: NewBob's validation-time
    # update_learning_rate (one rate for every group) never reaches the optimizer
    expected = [[pytest.approx(p * slanted_triangular(t, steps, 0.5, 4.0)) for p in peaks] for t in range(steps)]
    assert brain.used == expected
    expert = tmp_path / "expert" / "CKPT+expert"
    assert sorted(p.name for p in expert.iterdir()) == ["CKPT.yaml", "model.ckpt", "normalizer.ckpt"]


def test_fine_tuning_keys_that_would_be_ignored_are_errors(tmp_path, sb_hparams, sb_generalist):
    import speechbrain as sb

    from speechbrain_merge.brain import brain_from_hparams

    class PlainBrain(sb.Brain):
        """A recipe's Brain without the mixin."""

    hparams = sb_hparams(tmp_path / "run", tokenizer_folder=str(sb_generalist.output_folder / "tokenizer"))
    with pytest.raises(TrainingConfigError, match="hparams key 'llrd' is read by .*MergeableBrain, and PlainBrain"):
        brain_from_hparams(PlainBrain, {**hparams, "llrd": {"decay": DECAY, "layer_pattern": LAYER}})
    with pytest.raises(TrainingConfigError, match="hparams key 'lorra' is read by nothing; did you mean 'lora'"):
        CTCBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams={**hparams, "lorra": {"r": 4}})
    assert brain_from_hparams(PlainBrain, hparams).hparams.lr == hparams["lr"]  # without those keys, a plain Brain is fine
