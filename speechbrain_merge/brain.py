"""``MergeableBrain``: a ``speechbrain.Brain`` that fine-tunes experts for merging.

A recipe opts in by changing one class name, ``class ASR(sb.Brain)`` to
``class ASR(MergeableBrain)``, and adding any of these hparams keys (each optional):

``llrd``
    ``{decay, layer_pattern}``: LLRD groups over ``self.modules`` (names as in the
    ``modules`` dict, e.g. ``Transformer.encoder.layers.3.``), ``opt_class``'s ``lr`` at
    the top (:mod:`speechbrain_merge.training`).
``stlr``
    A :class:`~speechbrain_merge.training.SlantedTriangularSchedule` (``!new:``),
    stepped after every optimizer step and checkpointed as ``stlr``; without
    ``max_steps`` it spans the run's optimizer steps, counted when ``fit`` starts.
``lora``
    ``{r, alpha, dropout, target_modules}`` (:class:`merge_core.training.lora.LoraSettings`),
    module names relative to ``self.modules``; applied when fitting starts, after
    which only LoRA parameters train.
``lmam``
    ``{source_model, name_map, layers, init_lambda}`` (:class:`merge_core.attention.lmam.LmamSettings`):
    L-MAM (Sundar et al., Eq. 3), e.g. a BERT's attention into the HuBERT of
    ``speechbrain.integrations.huggingface.hubert.HuBERT`` (``name_map: bert_to_hubert``),
    its per-layer lambda learned with the model; applied when fitting starts (not
    together with ``lora``), folded in exports and snapshots.
``export_path``, ``export_recoverables``, ``export_name``
    A folder: when ``fit`` ends, the expert (LoRA and L-MAM folded, the base's keys) is
    saved there as ``CKPT+<export_name>`` (default ``CKPT+expert``) holding the named
    recoverables: by default the model's (the ``nn.Module`` ones, e.g. ``model`` and
    ``normalizer``), which is what a merge with the generalist wants; the optimizer,
    schedulers and counters of the run are left out.
``snapshot_every_n_steps``, ``snapshot_dir``
    Weights-only ``step-XXXXXXXX.safetensors`` snapshots (LoRA and L-MAM folded) for MAST:
    the checkpointer's state-dict recoverables, named as in a ``CKPT+`` folder.

A key of these on a Brain without the mixin, or one a typo away from them (``lorra``), is
an error naming it (:func:`check_hparams_keys`), not silence. With ``llrd`` or ``stlr``
the Brain owns the learning rates (:attr:`MergeableBrain.owns_learning_rate`): a recipe's
own annealing, such as NewBob's ``update_learning_rate``, must stay out.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Mapping

import speechbrain as sb
from speechbrain.dataio.dataloader import LoopedLoader
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.distributed import if_main_process
from torch.utils.data import DataLoader

from merge_core.errors import TrainingConfigError
from merge_core.attention.lmam import LmamSettings, apply_lmam_from_checkpoint, has_lmam, lmam_lambdas
from merge_core.training.lora import LoraSettings, apply_lora, has_lora
from speechbrain_merge.training import (
    EXPORT_NAME,
    AtomicCheckpointer,
    export_expert,
    llrd_optimizer,
    model_recoverables,
    write_trajectory_snapshot,
)

# the hparams keys MergeableBrain reads (see the module docstring)
MERGEABLE_KEYS = (
    "llrd", "stlr", "lora", "lmam", "export_path", "export_recoverables", "export_name",
    "snapshot_every_n_steps", "snapshot_dir",
)


def check_hparams_keys(brain_class: type, hparams: Mapping[str, Any]) -> None:
    """Refuse fine-tuning keys that would be silently ignored: a key of MergeableBrain's on
    a Brain without the mixin, or a key one typo away from one of them (``lorra``)."""
    if not issubclass(brain_class, MergeableBrain):
        given = [k for k in MERGEABLE_KEYS if hparams.get(k) is not None]
        if given:
            raise TrainingConfigError(
                f"hparams key {given[0]!r} is read by speechbrain_merge.brain.MergeableBrain, and "
                f"{brain_class.__name__} is a plain sb.Brain that would ignore it: derive it from MergeableBrain"
            )
    for key in hparams:
        near = difflib.get_close_matches(str(key), MERGEABLE_KEYS, n=1, cutoff=0.8)
        if near and key not in MERGEABLE_KEYS:
            raise TrainingConfigError(f"hparams key {key!r} is read by nothing; did you mean {near[0]!r}?")


def run_steps(batches_per_epoch: int, epoch_counter: Any, grad_accumulation_factor: int = 1) -> int:
    """The optimizer steps of a whole run: ``Brain`` steps once every
    ``grad_accumulation_factor`` batches, for each of the counter's ``limit`` epochs.

    >>> from speechbrain.utils.epoch_loop import EpochCounter
    >>> run_steps(10, EpochCounter(limit=3), grad_accumulation_factor=4)
    6
    """
    return max(1, batches_per_epoch // grad_accumulation_factor) * int(epoch_counter.limit)


def brain_from_hparams(brain_class: type[sb.Brain], hparams: dict[str, Any], run_opts: Any = None) -> sb.Brain:
    """``brain_class`` over the hparams' ``modules``, ``opt_class`` and ``checkpointer``, as
    recipes build it, after :func:`check_hparams_keys`."""
    check_hparams_keys(brain_class, hparams)
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_hparams_keys(type(self), vars(getattr(self, "hparams", None) or {}))
        if type(self.checkpointer) is Checkpointer:
            # hparams build a stock Checkpointer, whose interrupted saves break every
            # resume; turned in place (the recipe holds it too) into one that saves whole
            self.checkpointer.__class__ = AtomicCheckpointer

    def _setting(self, key: str) -> Any:
        return getattr(self.hparams, key, None)

    @property
    def owns_learning_rate(self) -> bool:
        """True when ``llrd`` or ``stlr`` set the rates: a recipe's annealing (NewBob's
        ``update_learning_rate`` sets one rate for every group) must then stay out."""
        return self._setting("llrd") is not None or self._setting("stlr") is not None

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

    def fit(self, epoch_counter: Any, train_set: Any, *args: Any, train_loader_kwargs: Any = None, **kwargs: Any) -> None:
        """``Brain.fit``, then the expert export when hparams has ``export_path``. An
        ``stlr`` without ``max_steps`` gets the run's optimizer steps, counted here."""
        schedule = self._setting("stlr")
        if schedule is not None and schedule.max_steps is None:
            if not isinstance(train_set, (DataLoader, LoopedLoader)):
                train_set = self.make_dataloader(train_set, stage=sb.Stage.TRAIN, **(train_loader_kwargs or {}))
            schedule.max_steps = run_steps(len(train_set), epoch_counter, self.grad_accumulation_factor)
        super().fit(epoch_counter, train_set, *args, train_loader_kwargs=train_loader_kwargs or {}, **kwargs)
        self.export_expert()

    def export_expert(self) -> Path | None:
        """The expert (LoRA and L-MAM folded) as a ``CKPT+`` folder under ``export_path``."""
        export_path = self._setting("export_path")
        if export_path is None or not if_main_process():
            return None
        if self.checkpointer is None:
            raise TrainingConfigError("export_path needs the Brain's checkpointer (its recoverables are exported)")
        available = self.checkpointer.recoverables
        names = self._setting("export_recoverables") or model_recoverables(available)
        unknown = [name for name in names if name not in available]
        if unknown:
            raise TrainingConfigError(
                f"export_recoverables: {unknown[0]!r} is not a recoverable; known: {', '.join(available)}"
            )
        recoverables = {name: available[name] for name in names}
        meta = {"optimizer_step": self.optimizer_step, "epoch": self.epoch_number}
        return export_expert(recoverables, self.modules, export_path, meta, self._setting("export_name") or EXPORT_NAME)
