"""Rebuild the bundled example: a tiny FastConformer-shaped generalist and three "experts".

The experts are the generalist plus structured random deltas (no training), so the
example shows the recipe mechanics, not accuracy. Deterministic:

    python examples/tiny/make_example.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

D_MODEL, LAYERS, VOCAB, KERNEL = 32, 2, 64, 9
HERE = Path(__file__).parent


def generalist(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    d = D_MODEL
    state = {"encoder.pre_encode.out.weight": w(d, 4 * d), "encoder.pre_encode.out.bias": torch.zeros(d)}
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        state.update(
            {
                p + "feed_forward1.linear1.weight": w(4 * d, d),
                p + "feed_forward1.linear2.weight": w(d, 4 * d),
                p + "self_attn.linear_q.weight": w(d, d),
                p + "self_attn.linear_k.weight": w(d, d),
                p + "self_attn.linear_v.weight": w(d, d),
                p + "self_attn.linear_out.weight": w(d, d),
                p + "self_attn.pos_bias_u": w(4, d // 4),
                p + "conv.pointwise_conv1.weight": w(2 * d, d, 1),
                p + "conv.depthwise_conv.weight": w(d, 1, KERNEL),
                p + "conv.batch_norm.weight": torch.ones(d),
                p + "conv.batch_norm.bias": torch.zeros(d),
                p + "conv.batch_norm.running_mean": torch.zeros(d),
                p + "conv.batch_norm.running_var": torch.ones(d),
                p + "conv.batch_norm.num_batches_tracked": torch.tensor(1000),
                p + "norm_out.weight": torch.ones(d),
            }
        )
    state["decoder.decoder_layers.0.weight"] = w(VOCAB + 1, d, 1)
    state["decoder.decoder_layers.0.bias"] = torch.zeros(VOCAB + 1)
    return state


def expert(base: dict[str, torch.Tensor], seed: int, steps: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        if t.is_floating_point():
            out[name] = t + 0.02 * torch.randn(t.shape, generator=g)
        else:
            out[name] = t + steps  # fine-tuning advanced the batch counter
    return out


def main() -> None:
    base = generalist()
    save_file(base, HERE / "generalist.safetensors")
    for seed, domain in enumerate(["noise", "telephone", "accent"], start=1):
        save_file(expert(base, seed, 200 * seed), HERE / f"expert_{domain}.safetensors")


if __name__ == "__main__":
    main()
