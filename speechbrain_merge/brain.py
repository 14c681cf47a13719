"""``MergeableBrain``: a ``speechbrain.Brain`` that fine-tunes experts for merging.

A recipe opts in by changing one class name, ``class ASR(sb.Brain)`` to
``class ASR(MergeableBrain)``, and adding any of these hparams keys (each optional):

``llrd``
    ``{decay, layer_pattern}``: LLRD groups over ``self.modules`` (names as in the
    ``modules`` dict, e.g. ``Transformer.encoder.layers.3.``), ``opt_class``'s ``lr`` at
    the top (:mod:`speechbrain_merge.training`).
``stlr``
    A :class:`~speechbrain_merge.training.SlantedTriangularSchedule` (``!new:``),
    stepped after every optimizer step and checkpointed as ``stlr``.
``lora``
    ``{r, alpha, dropout, target_modules}`` (:class:`merge_core.training.lora.LoraSettings`),
    module names relative to ``self.modules``; applied when fitting starts, after
    which only LoRA parameters train.
``lmam``
    ``{source_model, name_map, layers, init_lambda}`` (:class:`merge_core.lmam.LmamSettings`):
    L-MAM (seed 003, Eq. 3), e.g. a BERT's attention into the HuBERT of
    ``speechbrain.integrations.huggingface.hubert.HuBERT`` (``name_map: bert_to_hubert``),
    its per-layer lambda learned with the model; applied when fitting starts (not
    together with ``lora``), folded in exports and snapshots.
``export_path``, ``export_recoverables``
    A folder: when ``fit`` ends, the expert (LoRA folded, the base's keys) is saved
    there as a ``CKPT+`` folder of the named recoverables (default: all of the
    Checkpointer's). ``asr-merge merge`` wants every member to hold the base
    checkpoint's recoverables, so list those when the run added some (e.g. ``stlr``).
``snapshot_every_n_steps``, ``snapshot_dir``
    Weights-only ``step-XXXXXXXX.safetensors`` snapshots (LoRA and L-MAM folded) for MAST:
    the checkpointer's state-dict recoverables, named as in a ``CKPT+`` folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import speechbrain as sb
from speechbrain.utils.distributed import if_main_process

from merge_core.errors import TrainingConfigError
from merge_core.lmam import LmamSettings, apply_lmam_from_checkpoint, has_lmam, lmam_lambdas
from merge_core.training.lora import LoraSettings, apply_lora, has_lora
from speechbrain_merge.training import export_expert, llrd_optimizer, write_trajectory_snapshot


def brain_from_hparams(brain_class: type[sb.Brain], hparams: dict[str, Any], run_opts: Any = None) -> sb.Brain:
    """``brain_class`` over the hparams' ``modules``, ``opt_class`` and ``checkpointer``, as recipes build it."""
    return brain_class(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )


class MergeableBrain(sb.Brain):
    """``sb.Brain`` with LLRD, STLR, LoRA, L-MAM, trajectory snapshots and expert export,
    each switched on by its hparams key (see the module docstring)."""

    def _setting(self, key: str) -> Any:
        return getattr(self.hparams, key, None)

    def on_fit_start(self) -> None:
        # LoRA and L-MAM go in before Brain wraps modules for DDP, builds the optimizer
        # and recovers a checkpoint (whose state dict has their keys)
        self.apply_lora()
        self.apply_lmam()
        super().on_fit_start()

    def apply_lora(self) -> bool:
        """Inject ``lora`` into ``self.modules`` (once); True when it holds LoRA layers."""
        section = self._setting("lora")
        if section is None:
            return False
        settings = LoraSettings.from_mapping(section)
        if not has_lora(self.modules):
            apply_lora(self.modules, settings)
        return True

    def apply_lmam(self) -> bool:
        """Parametrize ``self.modules``' mapped attention as ``lmam`` says (once); True when
        the modules hold L-MAM."""
        section = self._setting("lmam")
        if section is None:
            return False
        if self._setting("lora") is not None:
            raise TrainingConfigError("lmam and lora cannot be combined: LoRA freezes the attention L-MAM trains")
        if not has_lmam(self.modules):
            apply_lmam_from_checkpoint(self.modules, LmamSettings.from_mapping(section))
        return True

    def lmam_lambdas(self) -> dict[str, float]:
        """L-MAM's current lambda of every parametrized tensor (empty without ``lmam``)."""
        return lmam_lambdas(self.modules)

    def init_optimizers(self) -> None:
        """Brain's optimizer, over LLRD groups when hparams has ``llrd``; then ``stlr``
        takes the groups' rates as its peaks."""
        section = self._setting("llrd")
        if section is not None and self.opt_class is not None:
            factory = self.opt_class
            # Brain.init_optimizers calls opt_class(parameters), which loses the names
            # LLRD needs; swapping the factory keeps Brain's own bookkeeping
            # (optimizers_dict, the "optimizer" recoverable)
            self.opt_class = lambda _parameters: llrd_optimizer(self.modules, factory, section)
            try:
                super().init_optimizers()
            finally:
                self.opt_class = factory
        else:
            super().init_optimizers()
        self.attach_stlr()

    def attach_stlr(self) -> None:
        """Attach ``stlr`` to the optimizer and register it as a recoverable."""
        schedule = self._setting("stlr")
        if schedule is None:
            return
        if self.opt_class is None:
            raise TrainingConfigError("stlr needs an optimizer: the Brain has no opt_class")
        schedule.attach(self.optimizer)
        if self.checkpointer is not None and "stlr" not in self.checkpointer.recoverables:
            self.checkpointer.add_recoverable("stlr", schedule)

    def on_fit_batch_end(self, batch: Any, outputs: Any, loss: Any, should_step: bool) -> None:
        """After an optimizer step: the next STLR rate, and a snapshot every N steps."""
        super().on_fit_batch_end(batch, outputs, loss, should_step)
        if not should_step:
            return
        schedule = self._setting("stlr")
        if schedule is not None:
            schedule.step()
        self.snapshot_if_due()

    def snapshot_if_due(self) -> Path | None:
        """A trajectory snapshot when ``optimizer_step`` is a multiple of ``snapshot_every_n_steps``."""
        every = self._setting("snapshot_every_n_steps")
        if every is None:
            return None
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise TrainingConfigError(f"snapshot_every_n_steps must be a positive integer, got {every!r}")
        directory = self._setting("snapshot_dir")
        if directory is None:
            raise TrainingConfigError("snapshot_every_n_steps is set but snapshot_dir is not")
        if self.checkpointer is None:
            raise TrainingConfigError("snapshot_every_n_steps needs the Brain's checkpointer (its recoverables are snapshotted)")
        if self.optimizer_step % every or not if_main_process():
            return None
        return write_trajectory_snapshot(self.checkpointer, self.modules, directory, self.optimizer_step, self.epoch_number)

    @property
    def epoch_number(self) -> int:
        """The ``epoch_counter``'s current epoch, 0 without one."""
        counter = self._setting("epoch_counter")
        return int(getattr(counter, "current", 0))

    def fit(self, *args: Any, **kwargs: Any) -> None:
        """``Brain.fit``, then the expert export when hparams has ``export_path``."""
        super().fit(*args, **kwargs)
        self.export_expert()

    def export_expert(self) -> Path | None:
        """The expert (LoRA and L-MAM folded) as a ``CKPT+`` folder under ``export_path``."""
        export_path = self._setting("export_path")
        if export_path is None or not if_main_process():
            return None
        if self.checkpointer is None:
            raise TrainingConfigError("export_path needs the Brain's checkpointer (its recoverables are exported)")
        available = self.checkpointer.recoverables
        names = self._setting("export_recoverables") or list(available)
        unknown = [name for name in names if name not in available]
        if unknown:
            raise TrainingConfigError(
                f"export_recoverables: {unknown[0]!r} is not a recoverable; known: {', '.join(available)}"
            )
        recoverables = {name: available[name] for name in names}
        meta = {"optimizer_step": self.optimizer_step, "epoch": self.epoch_number}
        return export_expert(recoverables, self.modules, export_path, meta)
