"""Expert fine-tuning pieces for SpeechBrain, usable straight from hparams YAML.

.. code-block:: yaml

    llrd:                        # layer-wise learning-rate decay over self.modules
        decay: 0.8
        layer_pattern: '^Transformer\\.encoder\\.layers\\.(\\d+)\\.'
    stlr: !new:speechbrain_merge.training.SlantedTriangularSchedule
        max_steps: 10000
        cut_frac: 0.1
        ratio: 32
    lora: {r: 16, target_modules: 'Transformer\\.encoder\\.layers\\.\\d+\\.convolution_module\\.(conv|bottleneck\\.0)'}
    export_path: !ref <output_folder>/expert
    snapshot_every_n_steps: 1000
    snapshot_dir: !ref <output_folder>/snapshots

:class:`speechbrain_merge.brain.MergeableBrain` reads these keys. The rules themselves
live in :mod:`merge_core.training`; this module only adapts them to SpeechBrain's
``Brain`` (its ``modules`` dict, ``opt_class``, ``Checkpointer``).

**Two layer stacks (Whisper).** ``layer_pattern`` may map stack names to patterns,
e.g. ``{encoder: ..., decoder: ...}``. Each stack is decayed from its own top:
encoder layer i of N_e gets lr_top * decay^(N_e - i), decoder layer j of N_d gets
lr_top * decay^(N_d - j), and every other parameter the lowest of all these rates.
The stacks sit side by side, not on top of each other: every decoder layer reads the
encoder's top layer through cross-attention, so the decoder's bottom layer is not
"deeper" than the encoder's top; numbering the decoder above the encoder would also
give the encoder of a 32 + 32 layer Whisper a rate of lr_top * 0.8^63, i.e. freeze it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from speechbrain.utils.checkpoints import (
    DEFAULT_SAVE_HOOKS,
    Checkpointer,
    get_default_hook,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
    torch_save,
)
from torch import nn
from torch.optim import Optimizer

from merge_core.errors import TrainingConfigError
from merge_core.training.llrd import check_decay, compile_layer_pattern, count_layers, layer_index, layer_learning_rates
from merge_core.training.folding import plain_weights
from merge_core.training.snapshots import snapshot_name, write_weights_snapshot
from merge_core.training.stlr import SlantedTriangularLR, check_stlr_settings

LLRD_KEYS = ("decay", "layer_pattern")


def layer_patterns(value: Any) -> dict[str, re.Pattern[str]]:
    """``llrd.layer_pattern`` as ``{stack name: compiled pattern}``; a single pattern
    is the stack ``""``."""
    if isinstance(value, str):
        return {"": compile_layer_pattern(value)}
    if isinstance(value, Mapping) and value and all(isinstance(v, str) for v in value.values()):
        return {str(stack): compile_layer_pattern(pattern) for stack, pattern in value.items()}
    raise TrainingConfigError(
        f"llrd.layer_pattern must be a regular expression or a mapping of stack names to them, got {value!r}"
    )


def check_llrd_section(section: Mapping[str, Any]) -> tuple[float, dict[str, re.Pattern[str]]]:
    """The validated ``llrd`` hparams section: ``(decay, {stack: pattern})``."""
    if not isinstance(section, Mapping):
        raise TrainingConfigError(f"llrd must be a mapping with keys {', '.join(LLRD_KEYS)}, got {section!r}")
    unknown = sorted(set(section) - set(LLRD_KEYS))
    if unknown:
        raise TrainingConfigError(f"unknown key llrd.{unknown[0]}; known keys: {', '.join(LLRD_KEYS)}")
    if "layer_pattern" not in section:
        raise TrainingConfigError("llrd.layer_pattern is missing: SpeechBrain models have no standard layer names")
    return check_decay(section.get("decay")), layer_patterns(section["layer_pattern"])


def _stack_layer(name: str, patterns: Mapping[str, re.Pattern[str]]) -> tuple[str, int] | None:
    """``(stack, layer index)`` of parameter ``name``, or None outside every stack."""
    for stack, pattern in patterns.items():
        index = layer_index(name, pattern)
        if index is not None:
            return stack, index
    return None


def stacked_llrd_param_groups(
    module: nn.Module, patterns: Mapping[str, re.Pattern[str]], decay: float, lr_top: float
) -> list[dict[str, Any]]:
    """LLRD parameter groups over one or more layer stacks, each decayed from its own top.

    Layer i of stack s, which has N_s layers, gets

    .. math:: \\eta_{s,i} = \\eta_{top} \\, \\alpha^{N_s - i}

    and every other trainable parameter :math:`\\min_{s} \\eta_{s,1}`. With one stack this
    is :func:`merge_core.training.llrd.llrd_param_groups` (same groups, rates and names).

    Parameters
    ----------
    module : torch.nn.Module
        The model; only parameters with ``requires_grad`` are grouped.
    patterns : mapping of str to re.Pattern
        Stack name to a pattern capturing the 0-based layer index (see :func:`layer_patterns`).
    decay : float
        alpha, in (0, 1].
    lr_top : float
        The top layer's rate, shared by every stack.

    Returns
    -------
    list of dict
        Groups ``"<stack> layer j"`` in stack then layer order, then ``"rest"``.

    Examples
    --------
    >>> model = nn.ModuleDict({"enc": nn.ModuleList([nn.Linear(1, 1), nn.Linear(1, 1)]), "out": nn.Linear(1, 1)})
    >>> groups = stacked_llrd_param_groups(model, layer_patterns(r"^enc\\.(\\d+)\\."), 0.5, 1.0)
    >>> [(g["name"], g["lr"]) for g in groups]
    [('layer 0', 0.5), ('layer 1', 1.0), ('rest', 0.5)]
    """
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


def optimizer_lr(optimizer_factory: Any) -> float:
    """The ``lr`` an hparams ``opt_class`` (``!name:torch.optim.AdamW`` with ``lr``) was
    given: the top layer's rate under LLRD."""
    lr = getattr(optimizer_factory, "keywords", {}).get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TrainingConfigError("llrd needs opt_class to be given lr (the top layer's rate), e.g. lr: !ref <lr>")
    return float(lr)


def llrd_optimizer(module: nn.Module, optimizer_factory: Any, section: Mapping[str, Any]) -> Optimizer:
    """``optimizer_factory`` (the hparams ``opt_class``) over LLRD groups of ``module``
    built from the ``llrd`` hparams section, with ``opt_class``'s ``lr`` at the top."""
    decay, patterns = check_llrd_section(section)
    return optimizer_factory(stacked_llrd_param_groups(module, patterns, decay, optimizer_lr(optimizer_factory)))


@register_checkpoint_hooks
class SlantedTriangularSchedule:
    """The slanted triangular schedule as an hparams object (``!new:``), stepped once per
    optimizer step; each group keeps its own peak, so LLRD ratios hold at every step
    (see :class:`merge_core.training.stlr.SlantedTriangularLR`):

    .. math:: \\eta^{(g)}_t = \\eta^{(g)}_{max} \\, \\frac{1 + p_t (ratio - 1)}{ratio}

    A recoverable: its step count is saved with the checkpoint and restored on resume.

    Parameters
    ----------
    max_steps : int
        T, the total number of optimizer steps.
    cut_frac : float
        Fraction of the steps spent increasing the rate.
    ratio : float
        Peak rate / lowest rate.
    """

    def __init__(self, max_steps: int, cut_frac: float = 0.1, ratio: float = 32.0) -> None:
        check_stlr_settings(max_steps, cut_frac, ratio)
        self.max_steps = max_steps
        self.cut_frac = cut_frac
        self.ratio = ratio
        self.scheduler: SlantedTriangularLR | None = None

    def attach(self, optimizer: Optimizer) -> None:
        """Take ``optimizer``'s current group rates as the peaks and set the step-0 rates."""
        self.scheduler = SlantedTriangularLR(
            optimizer, max_steps=self.max_steps, cut_frac=self.cut_frac, ratio=self.ratio
        )

    def _attached(self) -> SlantedTriangularLR:
        if self.scheduler is None:
            raise TrainingConfigError("stlr: the schedule was stepped before an optimizer was attached")
        return self.scheduler

    def step(self) -> None:
        """Advance one optimizer step."""
        self._attached().step()

    @mark_as_saver
    def save(self, path: str | Path) -> None:
        torch.save({"last_epoch": self._attached().last_epoch}, path)

    @mark_as_loader
    def load(self, path: str | Path, end_of_epoch: bool = False) -> None:
        scheduler = self._attached()
        scheduler.last_epoch = torch.load(path)["last_epoch"]
        # put the rates of the restored step back into the optimizer
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = lr


def state_dict_recoverables(checkpointer: Checkpointer) -> dict[str, nn.Module]:
    """The recoverables a ``Checkpointer`` saves as their plain ``state_dict`` (its
    ``torch_save`` hook): the ones whose ``<name>.ckpt`` holds the tensors ``asr-merge``
    merges. Objects with their own save hook (``InputNormalization``'s statistics, the
    optimizer) are left out."""
    return {
        name: obj
        for name, obj in checkpointer.recoverables.items()
        if isinstance(obj, nn.Module)
        and name not in checkpointer.custom_save_hooks
        and get_default_hook(obj, DEFAULT_SAVE_HOOKS) is torch_save
    }


def write_trajectory_snapshot(
    checkpointer: Checkpointer, modules: nn.Module, snapshot_dir: str | Path, step: int, epoch: int
) -> Path:
    """``snapshot_dir/step-XXXXXXXX.safetensors``: the tensors of the checkpointer's
    state-dict recoverables, named ``<recoverable>.<key>`` as ``asr-merge`` names a
    ``CKPT+`` folder's tensors, with LoRA and L-MAM in ``modules`` folded. A MAST recipe
    averages them with an exported expert's ``CKPT+`` folder as ``base_model``."""
    metadata = {"optimizer_step": str(step), "epoch": str(epoch)}
    with plain_weights(modules):
        state = {
            f"{name}.{key}": tensor
            for name, module in state_dict_recoverables(checkpointer).items()
            for key, tensor in module.state_dict().items()
        }
        return write_weights_snapshot(state, Path(snapshot_dir) / snapshot_name(step=step), metadata)


def export_expert(
    recoverables: Mapping[str, Any], modules: nn.Module, export_dir: str | Path, meta: Mapping[str, Any]
) -> Path:
    """Save ``recoverables`` as a ``CKPT+`` folder in ``export_dir`` with LoRA and L-MAM in
    ``modules`` folded, so the tensors carry the base's keys and the folder is an
    ``asr-merge merge`` member that SpeechBrain's ``Checkpointer`` recovers.

    Parameters
    ----------
    recoverables : mapping of str to object
        What to save, e.g. the Checkpointer's recoverables minus the optimizer.
    modules : torch.nn.Module
        Holds every LoRA layer and L-MAM tensor of the recoverables (the Brain's ``modules``).
    export_dir : str or pathlib.Path
        A Checkpointer folder; the expert is its newest ``CKPT+`` folder.
    meta : mapping
        Written into ``CKPT.yaml``.

    Returns
    -------
    pathlib.Path
        The ``CKPT+`` folder.
    """
    checkpointer = Checkpointer(export_dir, recoverables=dict(recoverables))
    with plain_weights(modules):
        return Path(checkpointer.save_checkpoint(meta=dict(meta), end_of_epoch=True).path)
