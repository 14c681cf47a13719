"""LoRA through PEFT on any torch model, depthwise convolutions included, and its fold-back.

The AoDE paper (Plantinga et al., "Parameter Averaging Is All You Need to Prevent Forgetting",
Sec. III-B) fine-tunes experts with LoRA of rank 16-32 and
scale alpha = 2r on the transformer layers *and* the depthwise convolution of
Parakeet, then merges LoRA back into the weights before averaging the experts.

PEFT's own ``Conv1d`` LoRA cannot do the depthwise part: it needs the rank to be
divisible by ``groups`` (= channels), cannot merge grouped convolutions, and rebuilds
the targeted layer's class with tuple arguments, which NeMo's ``CausalConv1D`` rejects.
:class:`Conv1dLora` is registered for every ``nn.Conv1d`` through PEFT's custom-module
API (``LoraConfig._register_custom_module``), which PEFT consults before its own
layers, so PEFT never rebuilds a convolution; linear layers keep PEFT's ``Linear``.

:func:`fold_lora` and :func:`lora_folded` give the plain model back: every LoRA layer
replaced by its base layer holding ``W + scale * B A``, so the state dict has exactly
the original keys and shapes and experts trained with LoRA can be averaged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call

from merge_core.errors import TrainingConfigError

SETTINGS_KEYS = ("r", "alpha", "dropout", "target_modules")


@dataclass(frozen=True)
class LoraSettings:
    """The ``lora`` config section: rank, scale, dropout and targeted module names.

    ``alpha`` None means 2r, the paper's choice; the update is scaled by alpha / r.
    ``target_modules`` is a list of module-name suffixes (``"linear_q"`` matches
    ``encoder.layers.0.self_attn.linear_q``) or one regular expression matched against
    whole module names, as PEFT reads it.
    """

    r: int
    target_modules: tuple[str, ...] | str
    alpha: float | None = None
    dropout: float = 0.0

    @property
    def scale_alpha(self) -> float:
        """alpha, defaulting to 2r."""
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> "LoraSettings":
        """Validated settings from a config section with keys ``r``, ``alpha``,
        ``dropout``, ``target_modules``."""
        unknown = sorted(set(section) - set(SETTINGS_KEYS))
        if unknown:
            raise TrainingConfigError(f"unknown key lora.{unknown[0]}; known keys: {', '.join(SETTINGS_KEYS)}")
        r = section.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise TrainingConfigError(f"lora.r must be a positive integer, got {r!r}")
        alpha = section.get("alpha")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
            raise TrainingConfigError(f"lora.alpha must be a positive number or null (2r), got {alpha!r}")
        dropout = section.get("dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise TrainingConfigError(f"lora.dropout must lie in [0, 1), got {dropout!r}")
        return cls(r=r, alpha=alpha, dropout=float(dropout), target_modules=_targets(section.get("target_modules")))


def _targets(value: Any) -> tuple[str, ...] | str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Sequence) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise TrainingConfigError(
        f"lora.target_modules must be a non-empty list of module names or a regular expression, got {value!r}"
    )


class Conv1dLora(nn.Module, LoraLayer):
    """LoRA for any ``nn.Conv1d``: depthwise, grouped or dense, subclasses such as
    NeMo's ``CausalConv1D`` included.

    The kernel W, of shape (C_out, C_in/g, k), is read as a C_out x (C_in/g * k) matrix
    and given a rank-r update:

    .. math:: W' = W + \\frac{\\alpha}{r} \\, (B A).\\mathrm{view}(C_{out}, C_{in}/g, k),
              \\quad A \\in \\mathbb{R}^{r \\times (C_{in}/g) k}, \\; B \\in \\mathbb{R}^{C_{out} \\times r}

    For a depthwise convolution (g = C_in = C_out = C) this is a low-rank update of the
    C x k kernel; note that matrix has rank at most k, so r >= k already allows any
    update. For a pointwise convolution (k = 1) it is ordinary LoRA on the C_out x C_in
    matrix. The forward pass calls the base layer's own ``forward`` with W' through
    ``torch.func.functional_call``, so subclass behaviour (``CausalConv1D``'s manual
    padding and streaming cache) is kept and gradients reach A and B. With LoRA dropout
    active, the LoRA branch is a second pass of the base layer over the dropped-out
    input with kernel ``scale * B A`` and no bias (PEFT's convention: dropout acts on the
    LoRA branch's input only). A and B live in PEFT's ``lora_A``/``lora_B`` dicts as
    ``nn.Linear`` weights, so PEFT's initialisation (B = 0), trainable-parameter marking,
    adapter switching and state-dict helpers apply unchanged.
    """

    def __init__(
        self,
        base_layer: nn.Conv1d,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: float = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # LoraLayer.update_layer builds A as Linear(in_features, r) and B as Linear(r, out_features)
        return module.in_channels // module.groups * module.kernel_size[0], module.out_channels

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """(alpha / r) * (B A) in the base kernel's shape."""
        product = self.lora_B[adapter].weight @ self.lora_A[adapter].weight
        return product.view(self.get_base_layer().weight.shape) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or the named) adapters' updates to the base kernel."""
        weight = self.get_base_layer().weight
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            merged = weight.data + self.get_delta_weight(adapter).detach().to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaN/Inf in the merged kernel: adapter {adapter!r} is broken")
            weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged adapters' updates from the base kernel again."""
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight.data = weight.data - self.get_delta_weight(adapter).detach().to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The base layer's forward with kernel W' (plus dropout branches when training)."""
        if "adapter_names" in kwargs:
            raise TypeError(f"lora.{type(self).__name__} does not support mixed adapter batches")
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        branched = [a for a in adapters if self._dropout_active(a)]
        weight = base.weight
        for adapter in adapters:
            if adapter not in branched:
                weight = weight + self.get_delta_weight(adapter).to(weight.dtype)
        out = functional_call(base, {"weight": weight}, (x, *args), kwargs)
        for adapter in branched:
            branch_params = {"weight": self.get_delta_weight(adapter), "bias": None}
            branch = functional_call(base, branch_params, (self.lora_dropout[adapter](x), *args), kwargs)
            out = _add_outputs(out, branch)
        return out

    def _dropout_active(self, adapter: str) -> bool:
        return self.training and not isinstance(self.lora_dropout[adapter], nn.Identity)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _add_outputs(out: Any, branch: Any) -> Any:
    # CausalConv1D called with a cache returns (output, next_cache): only outputs add
    if isinstance(out, tuple):
        return (out[0] + branch[0], *out[1:])
    return out + branch


def apply_lora(model: nn.Module, settings: LoraSettings, adapter_name: str = "default") -> nn.Module:
    """Inject LoRA layers into ``model`` in place; afterwards only LoRA parameters train.

    Linear layers get PEFT's LoRA, every targeted ``nn.Conv1d`` (subclasses included)
    :class:`Conv1dLora`. Each listed target name must match at least one module.

    Parameters
    ----------
    model : torch.nn.Module
        Any model; it stays the same object (PEFT's ``inject_adapter_in_model``, no wrapper).
    settings : LoraSettings
        Rank, alpha (default 2r), dropout and targets.
    adapter_name : str
        PEFT's adapter name.

    Returns
    -------
    torch.nn.Module
        ``model``.
    """
    targets = settings.target_modules
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.scale_alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets) if isinstance(targets, tuple) else targets,
        bias="none",
    )
    config._register_custom_module({nn.Conv1d: Conv1dLora})
    try:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    except ValueError as e:
        raise TrainingConfigError(f"lora.target_modules {settings.target_modules!r}: {e}") from None
    _check_every_target_matched(model, settings.target_modules)
    return model


def _check_every_target_matched(model: nn.Module, targets: tuple[str, ...] | str) -> None:
    # PEFT only refuses targets that match nothing at all; a misspelt entry next to good
    # ones would silently leave its layers untrained
    if isinstance(targets, str):
        return
    adapted = [name for name, _ in lora_layers(model)]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in adapted):
            raise TrainingConfigError(f"lora.target_modules entry {target!r} matches no module of the model")


def lora_layers(model: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    """``(qualified name, layer)`` of every PEFT layer in ``model``."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    """True when ``model`` holds PEFT layers."""
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def folded_weight(layer: BaseTunerLayer) -> torch.Tensor:
    """The base kernel plus the updates of every active, not yet merged adapter.

    .. math:: W' = W + \\sum_a \\frac{\\alpha_a}{r_a} B_a A_a
    """
    weight = layer.get_base_layer().weight
    if layer.disable_adapters:
        return weight.detach()
    merged = weight.detach()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A and adapter not in layer.merged_adapters:
            merged = merged + layer.get_delta_weight(adapter).detach().to(weight.dtype)
    return merged


def _fold_layer(model: nn.Module, name: str, layer: BaseTunerLayer) -> Callable[[], None]:
    """Put ``layer``'s base layer, holding the folded kernel, in its place; return the undo."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    base = layer.get_base_layer()
    original = base.weight.data
    base.weight.data = folded_weight(layer)
    setattr(parent, child, base)

    def undo() -> None:
        # the original tensor itself comes back: no W + d - d rounding
        base.weight.data = original
        setattr(parent, child, layer)

    return undo


def fold_lora(model: nn.Module) -> nn.Module:
    """Merge LoRA into the weights and remove the LoRA layers, in place (PEFT's
    ``merge_and_unload``): the state dict then has exactly the original keys and shapes.

    .. math:: W \\leftarrow W + \\frac{\\alpha}{r} B A

    Returns
    -------
    torch.nn.Module
        ``model``, now plain.
    """
    with torch.no_grad():
        for name, layer in lora_layers(model):
            _fold_layer(model, name, layer)
    # the record inject_adapter_in_model leaves on the model; merge_and_unload drops it too
    vars(model).pop("peft_config", None)
    return model


@contextlib.contextmanager
def lora_folded(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` is folded as by :func:`fold_lora` (for saving or
    snapshotting mid-training); on exit its LoRA layers and original base tensors are
    put back, bit for bit. A model without LoRA passes through unchanged."""
    with torch.no_grad():
        undos = [_fold_layer(model, name, layer) for name, layer in lora_layers(model)]
    try:
        yield model
    finally:
        for undo in reversed(undos):
            undo()
