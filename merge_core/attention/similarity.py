"""Which layers to merge: similarity of two models' hidden states on paired samples.

Sundar et al.'s Table 3 encodes each audio clip with the target (HuBERT) and its transcript
with the source (BERT), mean-pools every layer's output over time, and merges the
top-k layers whose two representation clouds are most alike, by Sliced Wasserstein
Distance, Euclidean distance or inner product. Everything here takes tensors of shape
``[layers, samples, dim]`` (layer i of one model against layer i of the other), so it
needs no toolkit: :func:`mean_pooled_hidden_states` builds them from any callable.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from merge_core.errors import RecipeError, TensorMismatchError

METRICS = ("swd", "euclidean", "inner_product")


def mean_pooled_hidden_states(
    encode: Callable[[object], Sequence[torch.Tensor]], samples: Iterable[object]
) -> torch.Tensor:
    """Stack ``[layers, samples, dim]`` mean-pooled hidden states.

    ``encode(sample)`` returns one hidden-state tensor per layer, each ``[time, dim]``
    (a leading batch dimension of 1 is dropped), e.g. for a Hugging Face model
    ``lambda x: model(**x, output_hidden_states=True).hidden_states[1:]``.
    Each is averaged over time, as the paper averages "by sequence length".
    """
    pooled = []
    with torch.no_grad():
        for sample in samples:
            layers = [h.squeeze(0) if h.dim() == 3 else h for h in encode(sample)]
            pooled.append(torch.stack([h.float().mean(dim=0) for h in layers]))
    return torch.stack(pooled, dim=1)


def _check_paired(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 3 or a.shape != b.shape:
        raise TensorMismatchError(
            f"hidden states must both be [layers, samples, dim] of one shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, *, projections: int = 128, seed: int = 0, p: int = 2
) -> torch.Tensor:
    """Per-layer Sliced Wasserstein Distance between the sample clouds of ``a`` and ``b``.

    SWD_p(A, B) = ( mean_theta W_p^p(theta^T A, theta^T B) )^(1/p) over random unit
    directions theta; in one dimension W_p between equal-size samples pairs sorted
    values. The directions come from a generator seeded with ``seed`` and are shared
    by every layer, so distances are comparable across layers and repeatable.
    """
    _check_paired(a, b)
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[-1], projections, generator=generator, dtype=torch.float64)
    theta /= theta.norm(dim=0, keepdim=True)
    project_a = torch.sort(a.double() @ theta, dim=1).values  # [layers, samples, projections]
    project_b = torch.sort(b.double() @ theta, dim=1).values
    return (project_a - project_b).abs().pow(p).mean(dim=(1, 2)).pow(1.0 / p)


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-layer mean over paired samples of ||a_n - b_n||_2."""
    _check_paired(a, b)
    return (a.double() - b.double()).norm(dim=-1).mean(dim=1)


def inner_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-layer mean over paired samples of <a_n, b_n> (a similarity: larger is closer)."""
    _check_paired(a, b)
    return (a.double() * b.double()).sum(dim=-1).mean(dim=1)


def rank_layers(a: torch.Tensor, b: torch.Tensor, metric: str = "swd", *, projections: int = 128, seed: int = 0) -> list[int]:
    """Layer indices, most similar first (smallest distance, or largest inner product).

    Ties keep the lower layer first (a stable sort), so the ranking is deterministic.
    """
    if metric == "swd":
        closeness = -sliced_wasserstein(a, b, projections=projections, seed=seed)
    elif metric == "euclidean":
        closeness = -euclidean(a, b)
    elif metric == "inner_product":
        closeness = inner_product(a, b)
    else:
        raise RecipeError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return torch.sort(closeness, descending=True, stable=True).indices.tolist()


def top_k_layers(a: torch.Tensor, b: torch.Tensor, k: int, metric: str = "swd", **options: int) -> list[int]:
    """The ``k`` most similar layers, ascending: a ready ``layers:`` list for a mam recipe."""
    return sorted(rank_layers(a, b, metric, **options)[:k])
