"""Jobs that ``test_crash.py`` starts as subprocesses and kills: a tiny seeded NeMo fine-tune
that exports its expert through :mod:`nemo_merge.callbacks`.

    python -m tests.hardening.crash_jobs nemo-finetune BASE.nemo MANIFEST.json OUT_DIR

NeMo's own fine-tuning script (``nemo_merge.finetune``) draws no seed, so two runs of it
train different experts; this job seeds everything, so a rerun exports the same weights
as an uninterrupted run, and the crash test can compare them exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

STEPS = 2  # optimizer steps: one epoch of the four-utterance manifest in batches of 2
SEED = 0


def nemo_finetune(base: Path, manifest: Path, out_dir: Path) -> None:
    """Restore ``base``, train ``STEPS`` steps on ``manifest`` with ``ExportExpert`` (to
    ``out_dir/expert.nemo``) and a trajectory snapshot every step (in ``out_dir/snapshots``)."""
    import lightning.pytorch as pl
    from nemo.collections.asr.models import ASRModel
    from omegaconf import open_dict

    from nemo_merge.callbacks import ExportExpert, TrajectorySnapshots
    from nemo_merge.testing import cpu_trainer, import_nemo_quietly

    import_nemo_quietly()
    pl.seed_everything(SEED, verbose=False)  # data order, dither, SpecAugment and dropout
    callbacks = [
        ExportExpert(str(out_dir / "expert.nemo")),
        TrajectorySnapshots(str(out_dir / "snapshots"), every_n_train_steps=1),
    ]
    trainer = cpu_trainer(STEPS, out_dir, callbacks)
    model = ASRModel.restore_from(str(base), map_location="cpu")
    model.set_trainer(trainer)  # NeMo takes the scheduler's max_steps from the trainer it was given
    with open_dict(model.cfg):
        model.cfg.optim.sched.warmup_steps = 0
        model.cfg.optim.sched.warmup_ratio = None
    model.setup_training_data(
        {
            "manifest_filepath": str(manifest),
            "sample_rate": 16000,
            "batch_size": 2,
            "shuffle": True,
            "num_workers": 0,
            "pin_memory": False,
            "max_duration": 20.0,
            "min_duration": 0.1,
        }
    )
    trainer.fit(model)


if __name__ == "__main__":
    job, *args = sys.argv[1:]
    if job != "nemo-finetune" or len(args) != 3:
        sys.exit("usage: python -m tests.hardening.crash_jobs nemo-finetune BASE.nemo MANIFEST.json OUT_DIR")
    nemo_finetune(*(Path(a) for a in args))
