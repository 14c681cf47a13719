"""Lightning callbacks that turn a NeMo fine-tuning run into an expert for merging.

Listed in the trainer config, they need no change to the model class:

.. code-block:: yaml

    trainer:
      callbacks:
        - {_target_: nemo_merge.callbacks.ExpertSetup}      # applies model.lora, model.lmam, model.llrd
        - {_target_: nemo_merge.callbacks.ExportExpert, path: expert.nemo}
        - {_target_: nemo_merge.callbacks.ExportBestExpert, path: best.nemo, monitor: val_wer}
        - {_target_: nemo_merge.callbacks.TrajectorySnapshots, dirpath: snapshots, every_n_train_steps: 1000}

NeMo 3.0's ``resolve_trainer_cfg`` instantiates ``trainer.callbacks`` only through
``safe_instantiate``, whose allow-list refuses callbacks outside
``lightning.pytorch.callbacks``; build the trainer with this module's
:func:`resolve_trainer_cfg` instead (``nemo_merge.finetune`` does). The callbacks
coexist with ``exp_manager``'s checkpointing and EMA: exports and snapshots only read
the model and write their own files; with LoRA, ``exp_manager``'s ``.nemo`` files are
folded too, while its ``.ckpt`` files keep the LoRA layers for resuming; the same holds
for L-MAM (``model.lmam``). Importing this
module registers the ``SlantedTriangular`` scheduler.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import hydra.utils
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from nemo.core.classes.common import safe_instantiate
from nemo.utils import logging
from nemo.utils.trainer_utils import resolve_trainer_cfg as nemo_resolve_trainer_cfg
from omegaconf import DictConfig, OmegaConf, open_dict

from merge_core.atomic import discard, publish, temp_path
from merge_core.errors import TrainingConfigError
from merge_core.training.folding import plain_weights
from merge_core.training.snapshots import snapshot_name, write_weights_snapshot
from nemo_merge.lmam import LMAM_KEY, apply_lmam_from_config, lmam_summary
from nemo_merge.lora import LORA_KEY, apply_lora_from_config
from nemo_merge.optim import LLRD_KEY, install_llrd, param_group_summary

TRUSTED_TARGET_PREFIX = "nemo_merge.callbacks."


class ExpertSetup(Callback):
    """Applies ``model.lora``, ``model.lmam`` and ``model.llrd`` before Lightning builds
    the optimizer (in ``setup``, which runs before ``configure_optimizers``), logs each
    optimizer group's learning rate when fitting starts and L-MAM's lambdas after
    every epoch.

    Parameters
    ----------
    llrd, lora, lmam : mapping, optional
        The sections themselves, for scripts whose model config never sees the
        fine-tuning config's ``model`` keys (NeMo's ``speech_to_text_finetune.py``
        restores the model from a ``.nemo``); written into ``model.cfg`` (replacing a
        section there), so the exported expert records them.
    """

    def __init__(
        self,
        llrd: Mapping[str, Any] | None = None,
        lora: Mapping[str, Any] | None = None,
        lmam: Mapping[str, Any] | None = None,
    ) -> None:
        given = ((LLRD_KEY, llrd), (LORA_KEY, lora), (LMAM_KEY, lmam))
        self.sections = {key: dict(value) for key, value in given if value is not None}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        with open_dict(pl_module.cfg):
            for key, section in self.sections.items():
                pl_module.cfg[key] = section
        if apply_lora_from_config(pl_module):
            trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            total = sum(p.numel() for p in pl_module.parameters())
            logging.info(f"LoRA: {trainable} of {total} parameters train")
        if apply_lmam_from_config(pl_module):
            logging.info(f"L-MAM: {lmam_summary(pl_module)}")
        install_llrd(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            for line in param_group_summary(optimizer):
                logging.info(f"optimizer group {line}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.cfg.get(LMAM_KEY) is not None:
            logging.info(f"L-MAM after epoch {trainer.current_epoch}: {lmam_summary(pl_module)}")


def export_expert(model: Any, path: str | Path) -> Path:
    """``model.save_to(path)`` made atomic: written beside ``path`` and renamed into place.
    With LoRA applied by :class:`ExpertSetup`, the archive holds the folded weights."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, ".nemo")
    try:
        model.save_to(str(tmp))
        publish(tmp, path)
    except BaseException:
        discard(tmp)
        raise
    return path


class ExportExpert(Callback):
    """Exports the expert ``.nemo`` (LoRA folded) when training ends: the weights being
    trained (with EMA on, not EMA's average).

    Parameters
    ----------
    path : str
        The ``.nemo`` to write.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            logging.info(f"exported expert {export_expert(pl_module, self.path)}")


class ExportBestExpert(Callback):
    """Exports the expert ``.nemo`` (LoRA folded) whenever ``monitor`` improves.

    It runs before ``exp_manager``'s EMA callback restores the training weights after
    validation, so with EMA it exports the EMA weights that were validated.

    Parameters
    ----------
    path : str
        The ``.nemo`` to write (replaced at each improvement).
    monitor : str
        A logged validation metric, e.g. ``val_wer``.
    mode : str
        ``min`` or ``max``: which direction is better.
    """

    def __init__(self, path: str, monitor: str = "val_wer", mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise TrainingConfigError(f"ExportBestExpert.mode must be min or max, got {mode!r}")
        self.path = Path(path)
        self.monitor = monitor
        self.mode = mode
        self.best = math.inf if mode == "min" else -math.inf

    def _improved(self, value: float) -> bool:
        return value < self.best if self.mode == "min" else value > self.best

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.monitor not in trainer.callback_metrics:
            known = ", ".join(sorted(trainer.callback_metrics)) or "none"
            raise TrainingConfigError(f"ExportBestExpert.monitor {self.monitor!r} was not logged; logged: {known}")
        value = float(trainer.callback_metrics[self.monitor])
        if not self._improved(value):
            return
        self.best = value
        if trainer.is_global_zero:
            export_expert(pl_module, self.path)
            logging.info(f"exported expert {self.path} ({self.monitor} {value:.4f})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.best = state_dict["best"]


class TrajectorySnapshots(Callback):
    """Weights-only snapshots every N optimizer steps or N epochs, for MAST (averaging
    checkpoints along one trajectory, Ducorroy and Riad).

    Each snapshot is ``dirpath/step-00001000.safetensors`` (or ``epoch-0003``): the
    model's state dict with LoRA folded, keys equal to a ``.nemo``'s
    ``model_weights.ckpt``, written atomically. Average them with ``asr-merge merge``
    and a ``.nemo`` of the same model as ``base_model`` (the template for config and
    tokenizer).

    Parameters
    ----------
    dirpath : str
        Folder of the snapshots.
    every_n_train_steps : int, optional
        Interval in optimizer steps.
    every_n_epochs : int, optional
        Interval in epochs (exactly one of the two is set).
    """

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None, every_n_epochs: int | None = None) -> None:
        if (every_n_train_steps is None) == (every_n_epochs is None):
            raise TrainingConfigError("TrajectorySnapshots: set exactly one of every_n_train_steps and every_n_epochs")
        for key, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise TrainingConfigError(f"TrajectorySnapshots.{key} must be a positive integer, got {value!r}")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self._last_step = -1

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        if not trainer.is_global_zero:
            return
        metadata = {"global_step": str(trainer.global_step), "epoch": str(trainer.current_epoch)}
        with plain_weights(pl_module):
            path = write_weights_snapshot(pl_module.state_dict(), self.dirpath / name, metadata)
        logging.info(f"trajectory snapshot {path}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # with gradient accumulation several batches end on the same optimizer step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0 and step != self._last_step:
            self._last_step = step
            self._write(trainer, pl_module, snapshot_name(step=step))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            self._write(trainer, pl_module, snapshot_name(epoch=epoch))


def _instantiate_callback(entry: Mapping[str, Any]) -> Callback:
    """Our callbacks directly (without recursion, so nested ``_target_`` keys stay
    inert), anything else through NeMo's allow-listed ``safe_instantiate``."""
    if str(entry.get("_target_", "")).startswith(TRUSTED_TARGET_PREFIX):
        return hydra.utils.instantiate(entry, _recursive_=False)
    return safe_instantiate(entry)


def switched_off(entry: Mapping[str, Any]) -> bool:
    """An export or snapshot callback of ours whose destination (``path`` or ``dirpath``)
    is null writes nothing: it is left out, so one override turns it off
    (``trainer.callbacks.3.dirpath=null``).

    >>> switched_off({"_target_": "nemo_merge.callbacks.TrajectorySnapshots", "dirpath": None})
    True
    """
    ours = str(entry.get("_target_", "")).startswith(TRUSTED_TARGET_PREFIX)
    return ours and any(key in entry and entry[key] is None for key in ("path", "dirpath"))


def resolve_trainer_cfg(trainer_cfg: DictConfig) -> dict[str, Any]:
    """NeMo's ``nemo.utils.trainer_utils.resolve_trainer_cfg`` that also accepts this
    module's callbacks in ``trainer.callbacks``.

    Parameters
    ----------
    trainer_cfg : omegaconf.DictConfig
        The ``trainer`` section.

    Returns
    -------
    dict
        Keyword arguments for ``lightning.pytorch.Trainer``.
    """
    container = OmegaConf.to_container(trainer_cfg, resolve=True)
    callbacks = container.pop("callbacks", None)
    resolved = nemo_resolve_trainer_cfg(OmegaConf.create(container))
    if callbacks is not None:
        resolved["callbacks"] = [_instantiate_callback(entry) for entry in callbacks if not switched_off(entry)]
    return resolved
