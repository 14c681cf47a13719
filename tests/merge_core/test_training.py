"""merge_core.training: the LLRD rule, the STLR schedule, the depthwise-conv LoRA layer
and snapshots, on plain torch models (no toolkit)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from merge_core.checkpoint import open_checkpoint
from merge_core.errors import MergeError
from merge_core.errors import TrainingConfigError
from merge_core.training.llrd import LLRDSettings, layer_learning_rates, llrd_param_groups
from merge_core.training.lora import (
    Conv1dLora,
    LoraSettings,
    apply_lora,
    fold_lora,
    has_lora,
    lora_folded,
    lora_layers,
)
from merge_core.training.snapshots import snapshot_name, write_weights_snapshot
from merge_core.training.stlr import SlantedTriangularLR, slanted_triangular

PATTERN = r"^encoder\.layers\.(\d+)\."


class Layer(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, channels)
        self.depthwise = nn.Conv1d(channels, channels, 5, padding=2, groups=channels)


class Encoder(nn.Module):
    def __init__(self, channels: int = 6, n_layers: int = 4) -> None:
        super().__init__()
        self.pre = nn.Linear(channels, channels)
        self.layers = nn.ModuleList(Layer(channels) for _ in range(n_layers))


class Toy(nn.Module):
    """Encoder layers named as in NeMo's Conformer, plus modules outside them."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.decoder = nn.Linear(6, 3)


class LeftPaddedConv1d(nn.Conv1d):
    """Pads on the left in ``forward`` and threads a cache, as NeMo's ``CausalConv1D`` does."""

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        padded = F.pad(x, (self.kernel_size[0] - 1, 0)) if cache is None else torch.cat([cache, x], dim=-1)
        out = super().forward(padded)
        return out if cache is None else (out, padded[..., -cache.size(-1) :])


class ConvBlock(nn.Module):
    def __init__(self, channels: int = 8, kernel: int = 5) -> None:
        super().__init__()
        self.pointwise = nn.Conv1d(channels, channels, 1)
        self.depthwise = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.causal = LeftPaddedConv1d(channels, channels, kernel, groups=channels, bias=False)
        self.out = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.causal(self.depthwise(self.pointwise(x))).transpose(1, 2))


def perturb_lora(model: nn.Module, seed: int = 0) -> None:
    """B is initialised to zero (LoRA starts as the identity): make the updates nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def lora_block(settings: dict | None = None, seed: int = 0) -> tuple[ConvBlock, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    block = ConvBlock()
    original = {k: v.clone() for k, v in block.state_dict().items()}
    default = {"r": 3, "target_modules": ["pointwise", "depthwise", "causal", "out"]}
    apply_lora(block, LoraSettings.from_mapping(settings or default))
    return block, original


# --- LLRD --------------------------------------------------------------------------------


def test_layer_rates_follow_the_papers_rule():
    rates = layer_learning_rates(4, 0.5, 1e-3)
    assert rates == [1e-3 * 0.5**3, 1e-3 * 0.5**2, 1e-3 * 0.5, 1e-3]
    assert layer_learning_rates(3, 1.0, 2e-4) == [2e-4] * 3


def test_llrd_groups_one_per_layer_and_the_lowest_rate_for_the_rest():
    model = Toy()
    groups = llrd_param_groups(model, PATTERN, decay=0.9, lr_top=1e-3)
    assert [g["name"] for g in groups] == ["layer 0", "layer 1", "layer 2", "layer 3", "rest"]
    for j in range(4):
        assert groups[j]["lr"] == 1e-3 * 0.9 ** (4 - (j + 1))
        assert {id(p) for p in groups[j]["params"]} == {id(p) for p in model.encoder.layers[j].parameters()}
    assert groups[-1]["lr"] == groups[0]["lr"] == 1e-3 * 0.9**3
    rest = {id(p) for p in [*model.encoder.pre.parameters(), *model.decoder.parameters()]}
    assert {id(p) for p in groups[-1]["params"]} == rest
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_llrd_skips_frozen_parameters_but_counts_their_layers():
    model = Toy()
    for p in model.parameters():
        p.requires_grad = False
    model.encoder.layers[1].linear.weight.requires_grad = True
    groups = llrd_param_groups(model, PATTERN, decay=0.5, lr_top=1.0)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("layer 1", 0.25, 1)]


def test_llrd_groups_build_a_working_optimizer():
    model = Toy()
    optimizer = torch.optim.AdamW(llrd_param_groups(model, PATTERN, 0.9, 1e-3), lr=5.0)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3 * 0.9**3, 1e-3 * 0.9**2, 1e-3 * 0.9, 1e-3, 1e-3 * 0.9**3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layer_pattern": PATTERN, "decay": 1.5, "lr_top": 1e-3}, "llrd.decay"),
        ({"layer_pattern": PATTERN, "decay": 0.0, "lr_top": 1e-3}, "llrd.decay"),
        ({"layer_pattern": r"^encoder\.layers\.\d+\.", "decay": 0.9, "lr_top": 1e-3}, "exactly one group"),
        ({"layer_pattern": r"^blocks\.(\d+)\.", "decay": 0.9, "lr_top": 1e-3}, "matches no parameter"),
        ({"layer_pattern": r"^(\d+", "decay": 0.9, "lr_top": 1e-3}, "not a regular expression"),
        ({"layer_pattern": PATTERN, "decay": 0.9, "lr_top": 0.0}, "optim.lr"),
    ],
)
def test_llrd_refuses_bad_settings_naming_the_key(kwargs, message):
    with pytest.raises(TrainingConfigError, match=message) as info:
        llrd_param_groups(Toy(), **kwargs)
    assert isinstance(info.value, MergeError)


def test_llrd_settings_from_a_config_section():
    settings = LLRDSettings.from_mapping({"decay": 0.8}, PATTERN)
    assert settings == LLRDSettings(decay=0.8, layer_pattern=PATTERN)
    with pytest.raises(TrainingConfigError, match="unknown key llrd.rate"):
        LLRDSettings.from_mapping({"decay": 0.8, "rate": 1}, PATTERN)
    with pytest.raises(TrainingConfigError, match="llrd.decay"):
        LLRDSettings.from_mapping({}, PATTERN)


# --- STLR --------------------------------------------------------------------------------


def howard_ruder(t: int, T: int, cut_frac: float, ratio: float) -> float:
    """Eq. 3 of Howard & Ruder (2018), verbatim."""
    cut = math.floor(T * cut_frac)
    p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
    return (1 + p * (ratio - 1)) / ratio


@pytest.mark.parametrize("T, cut_frac, ratio", [(100, 0.1, 32.0), (50, 0.2, 10.0), (30, 0.1, 1.0)])
def test_stlr_matches_the_published_formula(T, cut_frac, ratio):
    for t in range(T + 1):
        expected = howard_ruder(t, T, cut_frac, ratio)
        assert slanted_triangular(t, T, cut_frac, ratio) == pytest.approx(expected, rel=1e-12)


def test_stlr_shape():
    values = [slanted_triangular(t, 10, 0.2, 32.0) for t in range(15)]
    assert values[0] == 1 / 32 and values[2] == 1.0 and values[10] == 1 / 32
    assert values[:3] == sorted(values[:3]) and values[2:11] == sorted(values[2:11], reverse=True)
    assert values[11:] == [1 / 32] * 4  # the floor holds past the end
    # fewer steps than 1/cut_frac: no warm-up, the peak is the first step
    assert slanted_triangular(0, 4, 0.1, 8.0) == 1.0 and slanted_triangular(4, 4, 0.1, 8.0) == 1 / 8
    # T * cut_frac not whole: still ends exactly at the floor
    assert slanted_triangular(33, 33, 0.1, 32.0) == 1 / 32


@pytest.mark.parametrize(
    "args, key", [((0, 0, 0.1, 32.0), "max_steps"), ((0, 10, 1.0, 32.0), "cut_frac"), ((0, 10, 0.1, 0.5), "ratio")]
)
def test_stlr_refuses_bad_settings(args, key):
    with pytest.raises(TrainingConfigError, match=f"sched.{key}"):
        slanted_triangular(*args)


def test_stlr_scheduler_keeps_each_groups_ratio_at_every_step():
    params = [nn.Parameter(torch.zeros(2)) for _ in range(3)]
    peaks = [1e-3 * 0.9**2, 1e-3 * 0.9, 1e-3]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, peaks)], lr=1.0)
    scheduler = SlantedTriangularLR(optimizer, max_steps=20, cut_frac=0.2, ratio=16.0)
    for step in range(21):
        multiplier = slanted_triangular(step, 20, 0.2, 16.0)
        rates = [g["lr"] for g in optimizer.param_groups]
        assert rates == pytest.approx([peak * multiplier for peak in peaks], rel=1e-12)
        assert [r / rates[-1] for r in rates] == pytest.approx([0.81, 0.9, 1.0], rel=1e-12)
        optimizer.step()
        scheduler.step()


# --- LoRA --------------------------------------------------------------------------------


def test_depthwise_conv_gets_our_layer_with_a_channels_by_kernel_update():
    block, _ = lora_block()
    layer = block.depthwise
    assert isinstance(layer, Conv1dLora) and isinstance(block.causal, Conv1dLora)
    assert isinstance(block.causal.get_base_layer(), LeftPaddedConv1d)  # not rebuilt by PEFT
    assert layer.lora_A["default"].weight.shape == (3, 5)  # r x kernel
    assert layer.lora_B["default"].weight.shape == (8, 3)  # channels x r
    assert layer.scaling["default"] == 2.0  # alpha defaults to 2r
    perturb_lora(block)
    delta = layer.get_delta_weight("default")
    expected = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).view(8, 1, 5) * 2.0
    assert delta.shape == layer.get_base_layer().weight.shape == (8, 1, 5)
    torch.testing.assert_close(delta, expected)
    assert torch.linalg.matrix_rank(delta.view(8, 5)) <= 3


def test_lora_conv_forward_is_the_base_forward_with_the_updated_kernel():
    block, _ = lora_block()
    perturb_lora(block)
    x = torch.randn(2, 8, 11)
    for name in ("depthwise", "causal"):
        layer = getattr(block, name)
        base = layer.get_base_layer()
        weight = base.weight + layer.get_delta_weight("default")
        with torch.no_grad():
            if name == "depthwise":
                expected = F.conv1d(x, weight, base.bias, padding=2, groups=8)
            else:
                expected = F.conv1d(F.pad(x, (4, 0)), weight, None, groups=8)
            torch.testing.assert_close(layer(x), expected)


def test_lora_conv_keeps_the_streaming_cache_of_the_base_layer():
    block, _ = lora_block()
    perturb_lora(block)
    x, cache = torch.randn(1, 8, 6), torch.randn(1, 8, 4)
    out, next_cache = block.causal(x, cache=cache)
    assert out.shape == (1, 8, 6)
    torch.testing.assert_close(next_cache, torch.cat([cache, x], dim=-1)[..., -4:])


def test_folded_model_gives_the_lora_models_outputs_with_the_original_keys():
    block, original = lora_block()
    perturb_lora(block)
    x = torch.randn(3, 8, 17)
    with torch.no_grad():
        expected = block(x)
        with lora_folded(block):
            state = block.state_dict()
            assert list(state) == list(original)
            assert all(state[k].shape == original[k].shape for k in original)
            assert (block(x) - expected).abs().max() < 1e-5
        assert has_lora(block)
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)  # exactly restored
        fold_lora(block)
        assert not has_lora(block) and type(block.causal) is LeftPaddedConv1d and not hasattr(block, "peft_config")
        assert list(block.state_dict()) == list(original)
        assert (block(x) - expected).abs().max() < 1e-5
    changed = [k for k in original if not torch.equal(block.state_dict()[k], original[k])]
    assert changed == ["pointwise.weight", "depthwise.weight", "causal.weight", "out.weight"]


def test_only_lora_parameters_train_and_the_folded_depthwise_kernel_changes():
    block, original = lora_block()
    trainable = [n for n, p in block.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in block.parameters() if p.requires_grad], lr=0.5)
    x, target = torch.randn(4, 8, 9), torch.randn(4, 9, 3)
    for _ in range(3):
        optimizer.zero_grad()
        F.mse_loss(block(x), target).backward()
        optimizer.step()
    for name, param in block.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, original[name.replace("base_layer.", "")])
    fold_lora(block)
    for name in ("depthwise.weight", "causal.weight"):
        assert not torch.equal(block.state_dict()[name], original[name])


def test_peft_merge_and_unmerge_round_trip():
    block, original = lora_block()
    perturb_lora(block)
    x = torch.randn(2, 8, 7)
    with torch.no_grad():
        expected = block(x)
        block.depthwise.merge()
        assert block.depthwise.merged
        assert (block(x) - expected).abs().max() < 1e-5
        block.depthwise.unmerge()
    torch.testing.assert_close(block.depthwise.get_base_layer().weight, original["depthwise.weight"])


def test_lora_dropout_acts_on_the_branch_input_only():
    block, _ = lora_block({"r": 2, "dropout": 0.5, "target_modules": ["depthwise"]})
    perturb_lora(block)
    layer, x = block.depthwise, torch.randn(2, 8, 9)
    base, delta = layer.get_base_layer(), layer.get_delta_weight("default")
    layer.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    expected = base(x) + F.conv1d(dropped, delta, None, padding=2, groups=8)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad is not None
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv1d(x, base.weight + delta, base.bias, padding=2, groups=8))


def test_lora_settings_from_a_config_section():
    settings = LoraSettings.from_mapping({"r": 16, "target_modules": ["linear_q"]})
    assert settings.scale_alpha == 32.0
    assert LoraSettings.from_mapping({"r": 16, "alpha": 8, "target_modules": "x"}).scale_alpha == 8.0


@pytest.mark.parametrize(
    "section, message",
    [
        ({"r": 4, "rank": 2, "target_modules": ["x"]}, "unknown key lora.rank"),
        ({"r": 0, "target_modules": ["x"]}, "lora.r"),
        ({"r": 4, "alpha": -1, "target_modules": ["x"]}, "lora.alpha"),
        ({"r": 4, "dropout": 1.0, "target_modules": ["x"]}, "lora.dropout"),
        ({"r": 4, "target_modules": []}, "lora.target_modules"),
    ],
)
def test_lora_settings_refuse_bad_values_naming_the_key(section, message):
    with pytest.raises(TrainingConfigError, match=message):
        LoraSettings.from_mapping(section)


def test_lora_refuses_targets_that_match_nothing():
    with pytest.raises(TrainingConfigError, match="'depthwise_cnv' matches no module"):
        apply_lora(ConvBlock(), LoraSettings.from_mapping({"r": 2, "target_modules": ["depthwise", "depthwise_cnv"]}))
    with pytest.raises(TrainingConfigError, match="lora.target_modules"):
        apply_lora(ConvBlock(), LoraSettings.from_mapping({"r": 2, "target_modules": ["nothing"]}))


# --- snapshots ---------------------------------------------------------------------------


def test_snapshot_is_an_atomic_safetensors_of_the_state_dict(tmp_path):
    block = ConvBlock()
    path = tmp_path / "snaps" / snapshot_name(step=1000)
    assert write_weights_snapshot(block.state_dict(), path, {"global_step": "1000"}) == path
    assert path.name == "step-00001000.safetensors"
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    with open_checkpoint(path) as reader:
        assert sorted(reader.keys()) == sorted(block.state_dict())
        for name, tensor in block.state_dict().items():
            assert torch.equal(reader.get(name), tensor)
    assert snapshot_name(epoch=3) == "epoch-0003.safetensors"


def test_failed_snapshot_leaves_nothing_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = write_weights_snapshot({"a": torch.zeros(4)}, tmp_path / "x.safetensors")

    def crash_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("merge_core.training.snapshots.save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        write_weights_snapshot({"a": torch.ones(4)}, path)
    assert list(tmp_path.iterdir()) == [path]
    with open_checkpoint(path) as reader:
        assert torch.equal(reader.get("a"), torch.zeros(4))


def test_training_modules_stay_toolkit_free():
    code = (
        "import sys, merge_core.training.llrd, merge_core.training.stlr, merge_core.training.lora, "
        "merge_core.training.snapshots;"
        "toolkits = ('nemo', 'speechbrain', 'lightning', 'pytorch_lightning');"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in toolkits);"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
