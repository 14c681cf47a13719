"""The NeMo half of the AoDE demo (:mod:`merge_core.app.demo`): the shipped generalist
``models/nemo_generalist.nemo`` and one expert's fine-tuning by
:func:`nemo_merge.finetune.finetune` from ``configs/nemo/finetune_expert.yaml`` (LLRD +
slanted triangular schedule, LoRA folded back on export, per-epoch snapshots for MAST,
sampled hyper-parameters and the best dev-WER export for MAcT), as a user runs it on
Parakeet; evaluation by :func:`nemo_merge.evaluate.evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from merge_core.app.demo import DemoPlan, DemoToolkit, ExpertJob
from nemo_merge.evaluate import evaluate
from nemo_merge.mact import mact_overrides

REPO = Path(__file__).resolve().parents[1]
GENERALIST = REPO / "models" / "nemo_generalist.nemo"
FINETUNE_CONFIG = REPO / "configs" / "nemo" / "finetune_expert.yaml"
# the paper's LoRA: transformer layers and the depthwise convolution, rank 16, alpha 2r
LORA = {
    "r": 16,
    "alpha": None,
    "dropout": 0.0,
    "target_modules": ["linear_q", "linear_k", "linear_v", "linear_out", "linear1", "linear2",
                       "pointwise_conv1", "pointwise_conv2", "depthwise_conv"],
}


def finetune_config(plan: DemoPlan, job: ExpertJob, work_dir: Path) -> DictConfig:
    """``configs/nemo/finetune_expert.yaml`` set up for one expert of the demo."""
    size = plan.size
    domain = job.chain[-1]
    data = {"num_workers": 0, "pin_memory": False, "batch_size": size.batch_size}
    overrides: dict[str, Any] = {
        "name": job.name,
        "output_dir": str(work_dir),
        "init_from_nemo_model": str(plan.init_of(job)),
        "model": {
            "train_ds": {**data, "manifest_filepath": str(plan.manifest(domain, "train"))},
            "validation_ds": {**data, "manifest_filepath": str(plan.manifest(domain, "dev"))},
            "test_ds": data,
            "optim": {"lr": size.lora_lr if job.lora else size.lr},
            **({} if job.llrd else {"llrd": None}),  # the LLRD ablation: one rate for every layer
        },
        "trainer": {
            "devices": 1,
            "max_epochs": size.epochs,
            "max_steps": size.max_steps,
            "sync_batchnorm": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,  # the demo evaluates every model on the test sets afterwards
            "callbacks": [{"_target_": "nemo_merge.callbacks.ExpertSetup"}, export_callback(plan, job)],
        },
        "exp_manager": None,
    }
    if job.lora:
        overrides["model"]["lora"] = LORA
    snapshots = plan.snapshot_dir(job)
    if snapshots is not None:
        overrides["trainer"]["callbacks"].append(
            {"_target_": "nemo_merge.callbacks.TrajectorySnapshots", "dirpath": str(snapshots), "every_n_epochs": 1}
        )
    if job.keeps_best:  # MAcT keeps each run's best model on the dev set
        del overrides["trainer"]["limit_val_batches"]
        if size.max_steps > 0:  # a run shorter than an epoch validates where it stops
            overrides["trainer"]["val_check_interval"] = size.max_steps
    cfg = OmegaConf.merge(OmegaConf.load(plan.finetune.get("config") or FINETUNE_CONFIG), overrides)
    for key, value in (plan.finetune.get("overrides") or {}).items():  # an experiment's, as Hydra's key=value
        OmegaConf.update(cfg, key, value, merge=True)
    return OmegaConf.merge(cfg, mact_overrides(cfg, dict(job.hyper))) if job.hyper else cfg


def export_callback(plan: DemoPlan, job: ExpertJob) -> dict[str, Any]:
    """The expert at the end of training, or at its best dev WER for a MAcT run."""
    target = "ExportBestExpert" if job.keeps_best else "ExportExpert"
    return {"_target_": f"nemo_merge.callbacks.{target}", "path": str(plan.expert_path(job))}


def train_expert(plan: DemoPlan, job: ExpertJob, threads: int) -> Path:
    """Fine-tune one expert in this process; its ``.nemo`` is exported atomically."""
    import lightning.pytorch as pl
    import torch

    from nemo_merge.finetune import finetune

    torch.set_num_threads(threads)
    pl.seed_everything(plan.seed, verbose=False)
    finetune(finetune_config(plan, job, plan.out / "work" / job.name))
    return plan.expert_path(job)


def evaluate_demo(plan: DemoPlan, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
    """The demo's evaluation: NeMo's needs nothing beyond the config."""
    return evaluate(config)


def dev_options(plan: DemoPlan) -> dict[str, Any]:
    """A NeMo dev set needs nothing beyond its manifest."""
    return {}


NEMO = DemoToolkit(
    name="nemo",
    generalist=GENERALIST,
    prefix="",
    suffix=".nemo",
    train_expert=train_expert,
    evaluate=evaluate_demo,
    dev_options=dev_options,
    experiment=REPO / "configs" / "experiments" / "demo_nemo.yaml",
    fingerprint={"finetune_config": FINETUNE_CONFIG.read_text(encoding="utf-8"), "lora": LORA},
)
