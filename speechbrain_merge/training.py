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
e.g. ``{encoder: ..., decoder: ...}``: each stack is decayed from its own top
(:func:`merge_core.training.llrd.llrd_param_groups`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from speechbrain.utils.checkpoints import (
    CKPT_PREFIX,
    DEFAULT_SAVE_HOOKS,
    Checkpoint,
    Checkpointer,
    get_default_hook,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
    torch_save,
)
from speechbrain.utils.distributed import ddp_barrier
from torch import nn
from torch.optim import Optimizer

from merge_core.atomic import discard, publish, sweep_stale, temp_path
from merge_core.errors import TrainingConfigError
from merge_core.training.llrd import LLRDSettings
from merge_core.training.folding import plain_weights
from merge_core.training.snapshots import snapshot_name, write_weights_snapshot
from merge_core.training.stlr import SlantedTriangularLR, check_stlr_settings

EXPORT_NAME = "expert"  # an exported expert is <export_path>/CKPT+expert

def optimizer_lr(optimizer_factory: Any) -> float:
    """The ``lr`` an hparams ``opt_class`` (``!name:torch.optim.AdamW`` with ``lr``) was
    given: the top layer's rate under LLRD."""
    lr = getattr(optimizer_factory, "keywords", {}).get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TrainingConfigError("llrd needs opt_class to be given lr (the top layer's rate), e.g. lr: !ref <lr>")
    return float(lr)


def llrd_optimizer(module: nn.Module, optimizer_factory: Any, section: Mapping[str, Any]) -> Optimizer:
    """``optimizer_factory`` (the hparams ``opt_class``) over LLRD groups of ``module``
    built from the ``llrd`` hparams section, with ``opt_class``'s ``lr`` at the top.
    SpeechBrain models have no standard layer names: ``layer_pattern`` is required."""
    settings = LLRDSettings.from_mapping(section)
    return optimizer_factory(settings.param_groups(module, optimizer_lr(optimizer_factory)))


@register_checkpoint_hooks
class SlantedTriangularSchedule:
    """The slanted triangular schedule as an hparams object (``!new:``), stepped once per
    optimizer step; each group keeps its own peak, so LLRD ratios hold at every step
    (see :class:`merge_core.training.stlr.SlantedTriangularLR`):

    .. math:: \\eta^{(g)}_t = \\eta^{(g)}_{max} \\, \\frac{1 + p_t (ratio - 1)}{ratio}

    A recoverable: its step count is saved with the checkpoint and restored on resume.

    Parameters
    ----------
    max_steps : int, optional
        T, the total number of optimizer steps; by default the run's, counted by
        :meth:`speechbrain_merge.brain.MergeableBrain.fit` from the training loader and
        the epoch counter's limit.
    cut_frac : float
        Fraction of the steps spent increasing the rate.
    ratio : float
        Peak rate / lowest rate.
    """

    def __init__(self, max_steps: int | None = None, cut_frac: float = 0.1, ratio: float = 32.0) -> None:
        check_stlr_settings(1 if max_steps is None else max_steps, cut_frac, ratio)
        self.max_steps = max_steps
        self.cut_frac = cut_frac
        self.ratio = ratio
        self.scheduler: SlantedTriangularLR | None = None

    def attach(self, optimizer: Optimizer) -> None:
        """Take ``optimizer``'s current group rates as the peaks and set the step-0 rates."""
        if self.max_steps is None:
            raise TrainingConfigError("stlr.max_steps is not set, and the run's steps were not counted (fit does)")
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


class AtomicCheckpointer(Checkpointer):
    """SpeechBrain's ``Checkpointer`` whose checkpoints appear whole.

    SpeechBrain writes a checkpoint's ``CKPT.yaml`` first, then each recoverable, straight
    into its ``CKPT+...`` folder: a run killed meanwhile leaves a folder that every resume
    takes for the latest checkpoint and fails to load (an empty meta file, a truncated
    ``model.ckpt``). Here SpeechBrain writes the folder inside a hidden sibling
    (:func:`merge_core.atomic.temp_path`), renamed into place once complete; the sibling of
    a killed save is swept by the next save. :class:`~speechbrain_merge.brain.MergeableBrain`
    makes its checkpointer one.
    """

    _staging: tuple[Path, Path] | None = None  # (hidden sibling, final folder) of the save in progress

    def save_checkpoint(
        self,
        meta: Mapping[str, Any] | None = None,
        end_of_epoch: bool = True,
        name: str | None = None,
        verbosity: int = logging.INFO,
    ) -> Checkpoint | None:
        self._staging = None
        try:
            checkpoint = super().save_checkpoint(dict(meta or {}), end_of_epoch, name, verbosity)
            ddp_barrier()  # every process has written its part of the staged folder
            if checkpoint is None:  # not the main process: the main one publishes
                return None
            final = self._staging[1]
            publish(checkpoint.path, final)
        finally:
            if self._staging is not None:
                discard(self._staging[0])
        return Checkpoint(final, checkpoint.meta, {key: final / path.name for key, path in checkpoint.paramfiles.items()})

    def _new_checkpoint_dirpath(self) -> Path:
        return self._staged(super()._new_checkpoint_dirpath())

    def _custom_checkpoint_dirpath(self, name: str) -> Path:
        return self._staged(super()._custom_checkpoint_dirpath(name))

    def _staged(self, final: Path) -> Path:
        """Where SpeechBrain writes the checkpoint ``final``: under its name, in a new hidden sibling."""
        # temp_path sweeps only the stale siblings of its own destination, and every
        # checkpoint has a name of its own: sweep those of the earlier ones here
        for entry in os.listdir(self.checkpoints_dir):
            if entry.startswith(f".{CKPT_PREFIX}") and ".tmp-" in entry:
                sweep_stale(self.checkpoints_dir / entry[1 : entry.index(".tmp-")])
        staging = temp_path(final)
        staging.mkdir()
        self._staging = (staging, final)
        return staging / final.name


def model_recoverables(recoverables: Mapping[str, Any]) -> list[str]:
    """The recoverables that are the model (``nn.Module`` objects: ``model``, ``normalizer``):
    what an expert exports by default. The optimizer, schedulers, epoch counter, the
    Brain's step counter and dataloader positions describe one training run, and a merge
    wants exactly the generalist's recoverables in every member."""
    return [name for name, obj in recoverables.items() if isinstance(obj, nn.Module)]


def export_expert(
    recoverables: Mapping[str, Any],
    modules: nn.Module,
    export_dir: str | Path,
    meta: Mapping[str, Any],
    name: str = EXPORT_NAME,
) -> Path:
    """Save ``recoverables`` as the folder ``export_dir/CKPT+<name>`` with LoRA and L-MAM in
    ``modules`` folded, so the tensors carry the base's keys and the folder is an
    ``asr-merge merge`` member that SpeechBrain's ``Checkpointer`` recovers. The folder is
    written under a hidden name and renamed into place: a rerun replaces it whole.

    Parameters
    ----------
    recoverables : mapping of str to object
        What to save, e.g. :func:`model_recoverables` of the Checkpointer's.
    modules : torch.nn.Module
        Holds every LoRA layer and L-MAM tensor of the recoverables (the Brain's ``modules``).
    export_dir : str or pathlib.Path
        The folder of the exported expert.
    meta : mapping
        Written into ``CKPT.yaml``.
    name : str
        The checkpoint's name: ``CKPT+<name>``.

    Returns
    -------
    pathlib.Path
        The ``CKPT+`` folder.
    """
    dest = Path(export_dir) / f"CKPT+{name}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_path(dest)
    try:
        checkpointer = Checkpointer(staging, recoverables=dict(recoverables))
        with plain_weights(modules):
            saved = Path(checkpointer.save_checkpoint(meta=dict(meta), end_of_epoch=True, name=name).path)
        publish(saved, dest)
    finally:
        discard(staging)
    return dest
