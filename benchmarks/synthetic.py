"""Synthetic checkpoints for the merge benchmarks, and asr-merge's merge of them.

:func:`model_specs` gives FastConformer-large-like tensor names and shapes (d_model
512, relative-position attention, macaron feed-forwards, convolution modules, as many
layers as make about the size asked for); :func:`build_base` fills them with random
float32 weights and :func:`build_expert` makes an expert of a base: every float tensor
plus N(0, DELTA_SCALE^2) deltas, BatchNorm step counters moved on.
:func:`ensure_inputs` saves a base and its experts as ``.safetensors`` files once and
reuses them. :func:`child_ours` is the ``ours`` variant every merge benchmark runs on
its inputs, whatever their kind: :func:`merge_core.merge` of a recipe.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.measure import MB, timed
from merge_core.atomic import write_atomically

FORMAT_VERSION = 1  # bump when the synthetic model changes, to invalidate cached inputs

# FastConformer-large-like geometry
D_MODEL = 512
HEADS = 8
FF_MULT = 4
CONV_KERNEL = 9
SUB_CHANNELS = 256
FEATURES = 80
VOCAB = 1024
BASE_SCALE = 0.02
DELTA_SCALE = 1e-3

# ----------------------------------------------------------------------------- model


Shape = tuple[int, ...]


def pre_encode_specs(d: int) -> dict[str, tuple[Shape, str]]:
    """dw_striding subsampling: 3 stride-2 conv stages, then a linear to d_model."""
    c = SUB_CHANNELS
    p = "encoder.pre_encode."
    specs = {p + "conv.0.weight": ((c, 1, 3, 3), "f32"), p + "conv.0.bias": ((c,), "f32")}
    for i in (2, 5):
        specs[p + f"conv.{i}.weight"] = ((c, 1, 3, 3), "f32")
        specs[p + f"conv.{i}.bias"] = ((c,), "f32")
        specs[p + f"conv.{i + 1}.weight"] = ((c, c, 1, 1), "f32")
        specs[p + f"conv.{i + 1}.bias"] = ((c,), "f32")
    specs[p + "out.weight"] = ((d, c * (FEATURES // 8)), "f32")
    specs[p + "out.bias"] = ((d,), "f32")
    return specs


def layer_specs(i: int, d: int) -> dict[str, tuple[Shape, str]]:
    """One Conformer layer: macaron feed-forwards, relative-position attention, conv module."""
    p = f"encoder.layers.{i}."
    specs: dict[str, tuple[Shape, str]] = {}

    def norm(name: str) -> None:
        specs[p + name + ".weight"] = ((d,), "f32")
        specs[p + name + ".bias"] = ((d,), "f32")

    def feed_forward(name: str) -> None:
        norm("norm_" + name)
        specs[p + name + ".linear1.weight"] = ((FF_MULT * d, d), "f32")
        specs[p + name + ".linear1.bias"] = ((FF_MULT * d,), "f32")
        specs[p + name + ".linear2.weight"] = ((d, FF_MULT * d), "f32")
        specs[p + name + ".linear2.bias"] = ((d,), "f32")

    feed_forward("feed_forward1")
    norm("norm_conv")
    specs[p + "conv.pointwise_conv1.weight"] = ((2 * d, d, 1), "f32")
    specs[p + "conv.pointwise_conv1.bias"] = ((2 * d,), "f32")
    specs[p + "conv.depthwise_conv.weight"] = ((d, 1, CONV_KERNEL), "f32")
    specs[p + "conv.depthwise_conv.bias"] = ((d,), "f32")
    for stat in ("weight", "bias", "running_mean", "running_var"):
        specs[p + f"conv.batch_norm.{stat}"] = ((d,), "f32")
    specs[p + "conv.batch_norm.num_batches_tracked"] = ((), "i64")
    specs[p + "conv.pointwise_conv2.weight"] = ((d, d, 1), "f32")
    specs[p + "conv.pointwise_conv2.bias"] = ((d,), "f32")
    norm("norm_self_att")
    specs[p + "self_attn.pos_bias_u"] = ((HEADS, d // HEADS), "f32")
    specs[p + "self_attn.pos_bias_v"] = ((HEADS, d // HEADS), "f32")
    for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
        specs[p + f"self_attn.{lin}.weight"] = ((d, d), "f32")
        specs[p + f"self_attn.{lin}.bias"] = ((d,), "f32")
    specs[p + "self_attn.linear_pos.weight"] = ((d, d), "f32")
    feed_forward("feed_forward2")
    norm("norm_out")
    return specs


def decoder_specs(d: int) -> dict[str, tuple[Shape, str]]:
    return {
        "decoder.decoder_layers.0.weight": ((VOCAB + 1, d, 1), "f32"),
        "decoder.decoder_layers.0.bias": ((VOCAB + 1,), "f32"),
    }


def nbytes(specs: dict[str, tuple[Shape, str]]) -> int:
    return sum(math.prod(shape) * (8 if kind == "i64" else 4) for shape, kind in specs.values())


def layers_for_size(size_mb: float, d: int) -> int:
    fixed = nbytes(pre_encode_specs(d)) + nbytes(decoder_specs(d))
    return max(1, round((size_mb * MB - fixed) / nbytes(layer_specs(0, d))))


def model_specs(size_mb: float, d: int = D_MODEL) -> dict[str, tuple[Shape, str]]:
    specs = pre_encode_specs(d)
    for i in range(layers_for_size(size_mb, d)):
        specs.update(layer_specs(i, d))
    specs.update(decoder_specs(d))
    return specs


def largest_tensor_bytes(specs: dict[str, tuple[Shape, str]]) -> int:
    return max(nbytes({k: v}) for k, v in specs.items())


# ------------------------------------------------------------------------ building


def base_tensor(name: str, shape: Shape, kind: str, g: Any) -> Any:
    import torch

    if kind == "i64":
        return torch.tensor(1000, dtype=torch.int64)
    if name.endswith("running_var"):
        return torch.rand(shape, generator=g) + 0.5
    if name.endswith(".weight") and len(shape) == 1:  # norm scales
        return 1 + 0.01 * torch.randn(shape, generator=g)
    return BASE_SCALE * torch.randn(shape, generator=g)


def build_base(specs: dict[str, tuple[Shape, str]]) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    return {name: base_tensor(name, shape, kind, g) for name, (shape, kind) in specs.items()}


def build_expert(base: dict[str, Any], index: int) -> dict[str, Any]:
    """The base plus N(0, DELTA_SCALE^2) deltas; the BN step counter moves on too."""
    import torch

    g = torch.Generator().manual_seed(1000 + index)
    out = {}
    for name, t in base.items():
        if t.is_floating_point():
            out[name] = t + DELTA_SCALE * torch.randn(t.shape, generator=g)
        else:
            out[name] = t + 100 * (index + 1)
    return out


def save_atomic(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))


@dataclass(frozen=True)
class Inputs:
    """A base checkpoint and its experts, of any kind (``.safetensors``, ``.nemo`` ...)."""

    base: Path
    experts: list[Path]

    def all(self) -> list[Path]:
        return [self.base, *self.experts]


def ensure_inputs(workdir: Path, size_mb: float, experts: int) -> Inputs:
    """A base of about ``size_mb`` MB and ``experts`` experts as ``.safetensors`` files in
    ``workdir``, by parameters: missing ones are built, files already there are reused."""
    folder = workdir / f"inputs-v{FORMAT_VERSION}-d{D_MODEL}-{size_mb:g}MB"
    folder.mkdir(parents=True, exist_ok=True)
    inputs = Inputs(folder / "base.safetensors", [folder / f"expert_{i}.safetensors" for i in range(experts)])
    missing = [p for p in inputs.all() if not p.is_file()]
    if not missing:
        return inputs
    print(f"building {len(missing)} synthetic checkpoint(s) in {folder} ...", flush=True)
    start = time.perf_counter()
    base = build_base(model_specs(size_mb))
    if not inputs.base.is_file():
        save_atomic(base, inputs.base)
    for i, path in enumerate(inputs.experts):
        if not path.is_file():
            save_atomic(build_expert(base, i), path)
    print(f"  built in {time.perf_counter() - start:.1f} s", flush=True)
    return inputs


# ------------------------------------------------------------------ the ours variant


def child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`merge_core.merge` of the recipe ``spec`` describes (``method``,
    ``parameters``, ``base``, ``experts`` of weight 1, ``output``, ``hash_inputs``), timed."""
    from merge_core import Recipe, merge
    from merge_core.plugins import toolkits

    toolkits()  # the toolkit plugins and their checkpoint kinds, found before the timer starts
    recipe = Recipe.from_mapping(
        {
            "method": spec["method"],
            "base_model": spec["base"],
            "models": [{"model": p, "weight": 1.0} for p in spec["experts"]],
            "parameters": spec["parameters"],
            "output": spec["output"],
            "hash_inputs": spec.get("hash_inputs", True),
        }
    )
    return timed(lambda: {"merge_seconds": merge(recipe, progress=False).seconds})
