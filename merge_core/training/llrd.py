"""Layer-wise learning-rate decay (LLRD) as optimizer parameter groups.

The AoDE paper (Plantinga et al., "Parameter Averaging Is All You Need to Prevent
Forgetting", Sec. III-A, and its authors' talk, "Methods - LLRD") gives the top encoder
layer the highest learning rate and each layer below it ``decay`` times the rate of the
layer above; every parameter outside the encoder layers (preprocessor, pre-encoder,
decoder, ...) gets the lowest encoder layer's rate.
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


def layer_patterns(value: Any) -> dict[str, re.Pattern[str]]:
    """``layer_pattern`` as ``{stack name: compiled pattern}``; a single pattern is the
    stack ``""``.

    >>> sorted(layer_patterns({"encoder": r"^enc\\.(\\d+)\\.", "decoder": r"^dec\\.(\\d+)\\."}))
    ['decoder', 'encoder']
    """
    if isinstance(value, str):
        return {"": compile_layer_pattern(value)}
    if isinstance(value, Mapping) and value and all(isinstance(v, str) for v in value.values()):
        return {str(stack): compile_layer_pattern(pattern) for stack, pattern in value.items()}
    raise TrainingConfigError(
        f"llrd.layer_pattern must be a regular expression or a mapping of stack names to them, got {value!r}"
    )


def _stack_layer(name: str, patterns: Mapping[str, re.Pattern[str]]) -> tuple[str, int] | None:
    """``(stack, layer index)`` of parameter ``name``, or None outside every stack."""
    for stack, pattern in patterns.items():
        index = layer_index(name, pattern)
        if index is not None:
            return stack, index
    return None


LayerPattern = str | Mapping[str, str]


def llrd_param_groups(module: nn.Module, layer_pattern: LayerPattern, decay: float, lr_top: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups applying LLRD to ``module``'s trainable parameters,
    over one layer stack or several side by side, each decayed from its own top.

    Layer i of stack s, which has N_s layers (``layer_pattern`` captures the 0-based
    index j = i - 1 from the parameter name), gets

    .. math:: \\eta_{s,i} = \\eta_{top} \\, \\alpha^{N_s - i}

    and every other trainable parameter the lowest of the stacks' bottom rates,
    :math:`\\min_s \\eta_{s,1}`. With one stack (an encoder) this is the paper's rule,
    :math:`\\eta_i = \\eta_N \\alpha^{N - i}`, the rest at :math:`\\eta_1`.

    **Two stacks (Whisper).** The stacks sit side by side, not on top of each other:
    every decoder layer reads the encoder's top layer through cross-attention, so the
    decoder's bottom layer is not "deeper" than the encoder's top; numbering the decoder
    above the encoder would also give the encoder of a 32 + 32 layer Whisper a rate of
    lr_top * 0.8^63, i.e. freeze it.

    Parameters
    ----------
    module : torch.nn.Module
        The model; only parameters with ``requires_grad`` are grouped.
    layer_pattern : str or mapping of str to str
        Regular expression matched at the start of each parameter name, with one group
        capturing the layer index, e.g. ``r"^encoder\\.layers\\.(\\d+)\\."``; or stack name
        to such a pattern, e.g. ``{"encoder": ..., "decoder": ...}``.
    decay : float
        alpha, in (0, 1].
    lr_top : float
        The top layer's learning rate, shared by every stack.

    Returns
    -------
    list of dict
        One group per layer holding trainable parameters (``name`` ``"layer j"``, or
        ``"<stack> layer j"``), in stack then layer order, then ``"rest"``; each with
        ``params`` and ``lr``.

    Examples
    --------
    >>> model = nn.ModuleDict({"enc": nn.ModuleList([nn.Linear(1, 1), nn.Linear(1, 1)]), "out": nn.Linear(1, 1)})
    >>> [(g["name"], g["lr"]) for g in llrd_param_groups(model, r"^enc\\.(\\d+)\\.", 0.5, 1.0)]
    [('layer 0', 0.5), ('layer 1', 1.0), ('rest', 0.5)]
    """
    patterns = layer_patterns(layer_pattern)
    rates = {stack: layer_learning_rates(count_layers(module, p), decay, lr_top) for stack, p in patterns.items()}
    by_layer: dict[tuple[str, int], list[nn.Parameter]] = {}
    rest: list[nn.Parameter] = []
    for name, param in module.named_parameters():
        if param.requires_grad:
            place = _stack_layer(name, patterns)
            (rest if place is None else by_layer.setdefault(place, [])).append(param)
    order = list(patterns)
    groups = [
        {"name": f"{stack} layer {j}".lstrip(), "params": by_layer[(stack, j)], "lr": rates[stack][j]}
        for stack, j in sorted(by_layer, key=lambda place: (order.index(place[0]), place[1]))
    ]
    if rest:
        groups.append({"name": "rest", "params": rest, "lr": min(r[0] for r in rates.values())})
    return groups


@dataclass(frozen=True)
class LLRDSettings:
    """The ``llrd`` config section: ``decay`` (alpha) and ``layer_pattern`` (a regular
    expression capturing the layer index from parameter names, or stack name to one)."""

    decay: float
    layer_pattern: LayerPattern

    @classmethod
    def from_mapping(cls, section: Any, default_layer_pattern: str | None = None) -> "LLRDSettings":
        """Validated settings; ``layer_pattern`` defaults to the toolkit's encoder layers
        where it has standard names (NeMo), and is required where it has none."""
        if not isinstance(section, Mapping):
            raise TrainingConfigError(f"llrd must be a mapping with keys {', '.join(SETTINGS_KEYS)}, got {section!r}")
        unknown = sorted(set(section) - set(SETTINGS_KEYS))
        if unknown:
            raise TrainingConfigError(f"unknown key llrd.{unknown[0]}; known keys: {', '.join(SETTINGS_KEYS)}")
        decay = check_decay(section.get("decay"))
        layer_pattern = section.get("layer_pattern") or default_layer_pattern
        if layer_pattern is None:
            raise TrainingConfigError(
                "llrd.layer_pattern is missing: this model's layers have no standard names; give a regular "
                "expression capturing the layer index (or stack name -> one)"
            )
        layer_patterns(layer_pattern)
        return cls(decay=decay, layer_pattern=layer_pattern)

    def param_groups(self, module: nn.Module, lr_top: float) -> list[dict[str, Any]]:
        """:func:`llrd_param_groups` with these settings."""
        return llrd_param_groups(module, self.layer_pattern, self.decay, lr_top)
