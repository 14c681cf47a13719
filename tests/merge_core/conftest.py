"""Tiny checkpoints of every kind the core reads, built in the test's tmp folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

# FastConformer-like names, every dtype kind the engine must handle, a one-element tensor.
SHAPES = {
    "encoder.layers.0.self_attn.linear_q.weight": ((8, 8), torch.float32),
    "encoder.layers.0.self_attn.linear_q.bias": ((8,), torch.float32),
    "encoder.layers.0.conv.depthwise_conv.weight": ((8, 1, 3), torch.float32),
    "encoder.layers.0.conv.batch_norm.running_mean": ((8,), torch.float32),
    "encoder.layers.0.conv.batch_norm.num_batches_tracked": ((), torch.int64),
    "encoder.scale": ((1,), torch.float32),
    "decoder.decoder_layers.0.weight": ((5, 8, 1), torch.bfloat16),
    "decoder.decoder_layers.0.bias": ((5,), torch.float16),
    "preprocessor.mask": ((4,), torch.bool),
}

KINDS = ["safetensors", "sharded", "torch", "lightning"]


def make_state(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A base model (``base`` None) or an expert: base + a small random delta, with
    its integer buffers advanced, as fine-tuning does."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (shape, dtype) in SHAPES.items():
        if dtype == torch.bool:
            state[name] = torch.rand(shape, generator=g) > 0.5
        elif not dtype.is_floating_point:
            state[name] = torch.tensor(1000 + seed, dtype=dtype).reshape(shape)
        elif base is None:
            state[name] = torch.randn(shape, generator=g).to(dtype)
        else:
            state[name] = (base[name].float() + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    return state


def save_kind(state: dict[str, torch.Tensor], folder: Path, stem: str, kind: str) -> Path:
    """Write ``state`` as checkpoint ``kind``; returns the path a recipe names."""
    if kind == "safetensors":
        path = folder / f"{stem}.safetensors"
        save_file(state, path)
    elif kind == "sharded":
        path = folder / stem
        path.mkdir()
        names = list(state)
        shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, path / shard)
        index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    elif kind == "torch":
        path = folder / f"{stem}.pt"
        torch.save(state, path)
    elif kind == "lightning":
        path = folder / f"{stem}.ckpt"
        torch.save({"state_dict": state, "epoch": 3, "optimizer_states": [{"step": torch.tensor(9)}]}, path)
    else:
        raise ValueError(kind)
    return path


def output_path(folder: Path, kind: str) -> Path:
    return folder / {"safetensors": "merged.safetensors", "sharded": "merged", "torch": "merged.pt", "lightning": "merged.ckpt"}[kind]


def load_output(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """Read a merged output with the formats' own libraries (not merge_core)."""
    from safetensors.torch import load_file

    if kind == "safetensors":
        return load_file(path)
    if kind == "sharded":
        index = json.loads((path / "model.safetensors.index.json").read_text())
        out = {}
        for shard in set(index["weight_map"].values()):
            out.update(load_file(path / shard))
        return out
    obj = torch.load(path, weights_only=True)
    return obj["state_dict"] if kind == "lightning" else obj


@pytest.fixture
def checkpoints(tmp_path):
    """base + three experts, as in-memory dicts, for a kind chosen by the test."""
    base = make_state(0)
    experts = [make_state(i + 1, base) for i in range(3)]

    def write(kind: str) -> tuple[Path, list[Path]]:
        return save_kind(base, tmp_path, "base", kind), [save_kind(e, tmp_path, f"expert{i}", kind) for i, e in enumerate(experts)]

    return base, experts, write
