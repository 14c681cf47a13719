"""Layer-wise learning-rate decay (LLRD) as optimizer parameter groups.

The paper (seed 000, Sec. III-A; seed 001, "Methods - LLRD") gives the top encoder
layer the highest learning rate and each layer below it ``decay`` times the rate of
the layer above; every parameter outside the encoder layers (preprocessor,
pre-encoder, decoder, ...) gets the lowest encoder layer's rate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from merge_core.errors import TrainingConfigError

SETTINGS_KEYS = ("decay", "layer_pattern")


def check_decay(decay: Any) -> float:
    """``decay`` as a float, refused unless a number in (0, 1]."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
        raise TrainingConfigError(f"llrd.decay must be a number in (0, 1], got {decay!r}")
    return float(decay)


def layer_learning_rates(n_layers: int, decay: float, lr_top: float) -> list[float]:
    """The learning rate of each of ``n_layers`` layers, bottom (index 0) to top.

    .. math:: \\eta_i = \\eta_N \\, \\alpha^{N - i}, \\quad i = 1..N

    with :math:`\\eta_N` = ``lr_top`` and :math:`\\alpha` = ``decay``; entry ``j`` of the
    list is layer :math:`i = j + 1`.

    Parameters
    ----------
    n_layers : int
        N, the number of encoder layers.
    decay : float
        alpha, in (0, 1].
    lr_top : float
        eta_N, the top layer's learning rate.

    Returns
    -------
    list of float
        ``[lr_top * decay**(N-1), ..., lr_top * decay, lr_top]``.
    """
    check_decay(decay)
    if not lr_top > 0.0:
        raise TrainingConfigError(f"the top layer's learning rate (optim.lr) must be > 0, got {lr_top!r}")
    return [lr_top * decay ** (n_layers - i) for i in range(1, n_layers + 1)]


def compile_layer_pattern(layer_pattern: str) -> re.Pattern[str]:
    """``layer_pattern`` compiled; it must capture the layer index in exactly one group."""
    try:
        pattern = re.compile(layer_pattern)
    except re.error as e:
        raise TrainingConfigError(f"llrd.layer_pattern {layer_pattern!r} is not a regular expression ({e})") from None
    if pattern.groups != 1:
        raise TrainingConfigError(
            f"llrd.layer_pattern {layer_pattern!r} must have exactly one group capturing the layer index, "
            f"it has {pattern.groups}"
        )
    return pattern


def layer_index(name: str, pattern: re.Pattern[str]) -> int | None:
    """The layer index ``pattern`` captures at the start of parameter ``name``, or None."""
    match = pattern.match(name)
    return int(match.group(1)) if match else None


def count_layers(module: nn.Module, pattern: re.Pattern[str]) -> int:
    """N: one more than the highest layer index among all of ``module``'s parameters
    (frozen ones included, so LoRA on some layers does not change the depth)."""
    indices = [i for i in (layer_index(n, pattern) for n, _ in module.named_parameters()) if i is not None]
    if not indices:
        raise TrainingConfigError(f"llrd.layer_pattern {pattern.pattern!r} matches no parameter name of the model")
    return max(indices) + 1


def llrd_param_groups(module: nn.Module, layer_pattern: str, decay: float, lr_top: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups applying LLRD to ``module``'s trainable parameters.

    Encoder layer i of N (``layer_pattern`` captures its 0-based index j = i - 1 from
    the parameter name) gets

    .. math:: \\eta_i = \\eta_N \\, \\alpha^{N - i}

    and every other trainable parameter the lowest layer's rate
    :math:`\\eta_1 = \\eta_N \\alpha^{N-1}`, as the paper does.

    Parameters
    ----------
    module : torch.nn.Module
        The model; only parameters with ``requires_grad`` are grouped.
    layer_pattern : str
        Regular expression matched at the start of each parameter name, with one group
        capturing the layer index, e.g. ``r"^encoder\\.layers\\.(\\d+)\\."``.
    decay : float
        alpha, in (0, 1].
    lr_top : float
        eta_N, the top encoder layer's learning rate.

    Returns
    -------
    list of dict
        One group per layer holding trainable parameters (``name`` ``"layer j"``), then
        one (``name`` ``"rest"``) for the others; each with ``params`` and ``lr``.
    """
    pattern = compile_layer_pattern(layer_pattern)
    rates = layer_learning_rates(count_layers(module, pattern), decay, lr_top)
    by_layer: dict[int, list[nn.Parameter]] = {}
    rest: list[nn.Parameter] = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        index = layer_index(name, pattern)
        (rest if index is None else by_layer.setdefault(index, [])).append(param)
    groups = [{"name": f"layer {j}", "params": by_layer[j], "lr": rates[j]} for j in sorted(by_layer)]
    if rest:
        groups.append({"name": "rest", "params": rest, "lr": rates[0]})
    return groups


@dataclass(frozen=True)
class LLRDSettings:
    """The ``llrd`` config section: ``decay`` (alpha) and ``layer_pattern`` (a regular
    expression capturing the encoder layer index from parameter names)."""

    decay: float
    layer_pattern: str

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any], default_layer_pattern: str) -> "LLRDSettings":
        """Validated settings; ``layer_pattern`` defaults to the toolkit's encoder layers."""
        unknown = sorted(set(section) - set(SETTINGS_KEYS))
        if unknown:
            raise TrainingConfigError(f"unknown key llrd.{unknown[0]}; known keys: {', '.join(SETTINGS_KEYS)}")
        decay = check_decay(section.get("decay"))
        layer_pattern = section.get("layer_pattern") or default_layer_pattern
        compile_layer_pattern(layer_pattern)
        return cls(decay=decay, layer_pattern=layer_pattern)

    def param_groups(self, module: nn.Module, lr_top: float) -> list[dict[str, Any]]:
        """:func:`llrd_param_groups` with these settings."""
        return llrd_param_groups(module, self.layer_pattern, self.decay, lr_top)
