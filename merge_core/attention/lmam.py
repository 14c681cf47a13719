"""L-MAM (Sundar et al., Eq. 3): learn a per-layer interpolation factor while fine-tuning.

Sundar et al., "Multimodal Attention Merging for Improved Speech Recognition and Audio Event Classification".

Each mapped attention tensor of the target model becomes, through a
``torch.nn.utils.parametrize`` parametrization,

    W_i = lambda_i * W_s,i + (1 - lambda_i) * W_t,i                      (3)

with W_t,i the module's own (trainable) tensor, W_s,i a frozen buffer copied from the
source model, and lambda_i one trainable scalar shared by layer i's Q, K and V.

lambda_i = sigmoid(a_i) for a trainable logit a_i. A sigmoid rather than a clamp:
it keeps lambda_i inside [0, 1] whatever an optimizer step does, and its gradient
never vanishes exactly, whereas a clamped lambda that reaches 0 or 1 gets zero
gradient and can never come back. The price is that 0 and 1 themselves are only
approached, so ``init_lambda`` must lie strictly inside (0, 1).

:func:`fold_lmam` bakes the learned W_i into plain tensors, so the exported state dict
has exactly the original model's keys and loads into an unmodified model;
:func:`lmam_folded` does so for the duration of a ``with`` block (export mid-training).
The toolkits switch L-MAM on with an ``lmam`` config section (:class:`LmamSettings`):
``model.lmam`` in NeMo's fine-tuning config, the ``lmam`` hparams key of SpeechBrain's
``MergeableBrain`` (each toolkit's adapter).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from merge_core.checkpoint import open_checkpoint
from merge_core.errors import TensorMismatchError, TrainingConfigError
from merge_core.attention.name_map import map_tensors, resolve_name_map


class AttentionInterpolation(nn.Module):
    """The parametrization W_t -> lambda * W_s + (1 - lambda) * W_t (Eq. 3)."""

    def __init__(self, source: torch.Tensor, logit: nn.Parameter) -> None:
        super().__init__()
        self.register_buffer("source", source.detach().clone())
        self.logit = logit  # shared by the layer's Q/K/V parametrizations

    @property
    def lam(self) -> torch.Tensor:
        """lambda_i = sigmoid(a_i), always in [0, 1]."""
        return torch.sigmoid(self.logit)

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        return torch.lerp(target, self.source.to(target.dtype), self.lam.to(target.dtype))


def _initial_logit(init_lambda: float) -> float:
    if not 0.0 < init_lambda < 1.0:
        raise TrainingConfigError(f"L-MAM init_lambda must lie strictly inside (0, 1) (lambda is a sigmoid), got {init_lambda}")
    return math.log(init_lambda / (1.0 - init_lambda))


def _split(name: str) -> tuple[str, str]:
    module, _, attribute = name.rpartition(".")
    return module, attribute


def apply_lmam(
    model: nn.Module,
    source_state: Mapping[str, torch.Tensor],
    name_map: str | Mapping[str, str],
    layers: Iterable[int] | None = None,
    init_lambda: float = 0.1,
) -> dict[int, nn.Parameter]:
    """Parametrize ``model``'s mapped attention tensors as Eq. 3; returns the logits a_i by layer.

    ``name_map`` is a built-in map's name or ``{source_pattern: target_pattern}`` (see
    :mod:`merge_core.attention.name_map`); ``layers`` restricts the layers (default: all mapped).
    The logits are registered in the model, so ``model.parameters()`` hands them to
    the optimizer with everything else.
    """
    target_state = model.state_dict()
    pairs = map_tensors(resolve_name_map(name_map), list(source_state), list(target_state), "source state", "model")
    chosen = None if layers is None else set(layers)
    logit = _initial_logit(init_lambda)
    logits: dict[int, nn.Parameter] = {}
    for pair in pairs:
        if chosen is not None and pair.layer not in chosen:
            continue
        source, target = source_state[pair.source], target_state[pair.target]
        if source.shape != target.shape:
            raise TensorMismatchError(
                f"source tensor {pair.source!r} has shape {tuple(source.shape)}, model tensor {pair.target!r} has {tuple(target.shape)}"
            )
        if pair.layer not in logits:
            logits[pair.layer] = nn.Parameter(torch.tensor(logit, dtype=target.dtype, device=target.device))
        module, attribute = _split(pair.target)
        parametrize.register_parametrization(
            model.get_submodule(module), attribute, AttentionInterpolation(source.to(target.device), logits[pair.layer])
        )
    return logits


def lmam_lambdas(model: nn.Module) -> dict[str, float]:
    """The current lambda of every parametrized tensor, by its original state-dict name."""
    return {
        f"{module_name}.{attribute}".lstrip("."): float(p.lam.detach())
        for module_name, module in model.named_modules()
        if parametrize.is_parametrized(module)
        for attribute, plist in module.parametrizations.items()
        for p in plist
        if isinstance(p, AttentionInterpolation)
    }


def fold_lmam(model: nn.Module) -> nn.Module:
    """Replace every L-MAM parametrization by its current value W_i (in place); returns ``model``."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for attribute in list(module.parametrizations):
            if any(isinstance(p, AttentionInterpolation) for p in module.parametrizations[attribute]):
                parametrize.remove_parametrizations(module, attribute, leave_parametrized=True)
    return model


@contextlib.contextmanager
def lmam_folded(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model``'s L-MAM tensors are folded as by :func:`fold_lmam` (for
    saving or snapshotting mid-training); on exit the parametrizations, the trainable
    tensors W_t (the same ``Parameter`` objects, so optimizers keep them) and their values
    are put back bit for bit. A model without L-MAM passes through unchanged."""
    undos = []
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for attribute in list(module.parametrizations):
            plist = module.parametrizations[attribute]
            if any(isinstance(p, AttentionInterpolation) for p in plist):
                undos.append((module, attribute, list(plist), plist.original, plist.original.detach().clone()))
    fold_lmam(model)
    try:
        yield model
    finally:
        for module, attribute, parametrizations, original, value in undos:
            # remove_parametrizations wrote W_i into W_t's storage; W_t comes back first,
            # and registering in the original order keeps the state dict's key order
            with torch.no_grad():
                original.copy_(value)
            for parametrization in parametrizations:
                parametrize.register_parametrization(module, attribute, parametrization)


@dataclass(frozen=True)
class LmamSettings:
    """An ``lmam`` config section: the frozen source, the name map, the layers, lambda's start."""

    source_model: str
    name_map: str | dict[str, str]
    layers: tuple[int, ...] | None = None
    init_lambda: float = 0.1

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any], default_name_map: str | None = None) -> "LmamSettings":
        """Validate a config section ``{source_model, name_map, layers, init_lambda}``;
        ``default_name_map`` stands in for a missing ``name_map`` (the toolkit's built-in)."""
        unknown = sorted(set(section) - {f.name for f in fields(cls)})
        if unknown:
            raise TrainingConfigError(f"lmam: unknown key(s) {unknown}; it accepts: {', '.join(f.name for f in fields(cls))}")
        if not section.get("source_model"):
            raise TrainingConfigError("lmam: source_model (the checkpoint whose attention is merged in) is required")
        name_map = section.get("name_map") or default_name_map
        if name_map is None:
            raise TrainingConfigError("lmam: name_map is required (a built-in map's name or {source: target} patterns)")
        layers = section.get("layers")
        if layers is not None and (
            not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        ):
            raise TrainingConfigError(f"lmam.layers must be a list of layer indices >= 0 or null, got {layers!r}")
        init_lambda = section.get("init_lambda", cls.init_lambda)
        _initial_logit(float(init_lambda))
        resolved = resolve_name_map(name_map if isinstance(name_map, str) else dict(name_map))
        return cls(
            source_model=str(section["source_model"]),
            name_map=name_map if isinstance(name_map, str) else resolved,
            layers=None if layers is None else tuple(layers),
            init_lambda=float(init_lambda),
        )


def apply_lmam_from_checkpoint(model: nn.Module, settings: LmamSettings) -> dict[int, nn.Parameter]:
    """:func:`apply_lmam` with the source tensors read from ``settings.source_model`` (any
    checkpoint kind ``asr-merge`` reads); only the mapped tensors are loaded."""
    with open_checkpoint(settings.source_model) as source:
        pairs = map_tensors(
            resolve_name_map(settings.name_map), source.keys(), list(model.state_dict()), f"source {source.path}", "model"
        )
        source_state = {pair.source: source.get(pair.source) for pair in pairs}
    return apply_lmam(model, source_state, settings.name_map, settings.layers, settings.init_lambda)


def has_lmam(model: nn.Module) -> bool:
    """Whether ``model`` holds L-MAM parametrizations."""
    return bool(lmam_lambdas(model))
