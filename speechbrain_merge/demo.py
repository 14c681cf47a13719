"""The SpeechBrain half of the AoDE demo (:mod:`merge_core.app.demo`): the shipped generalist
``models/speechbrain_generalist/`` and one expert's fine-tuning by a real ``Brain.fit``
of the ``train_ctc`` recipe with :class:`~speechbrain_merge.brain.MergeableBrain`'s
hparams keys (``llrd``, ``stlr``, ``lora``, ``export_path``, ``snapshot_every_n_steps``),
as a user's recipe gets them (a MAcT run samples the learning rate, weight decay and
dropout: the tiny recipe has no SpecAugment and one dropout); evaluation by :func:`speechbrain_merge.evaluate.evaluate` on CSV manifests.

The generalist folder holds ``CKPT+generalist/`` (``model`` and ``normalizer``),
``tokenizer/`` and ``generalist.json``, whose ``hparams`` rebuild its architecture
from ``configs/speechbrain/tiny_ctc.yaml`` (training) and ``tiny_ctc_inference.yaml``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

from merge_core.app.demo import DemoPlan, DemoToolkit, ExpertJob
from merge_core.atomic import publish
from speechbrain_merge.evaluate import evaluate
from speechbrain_merge.recipes.train_ctc import CTCBrain, csv_dataset

REPO = Path(__file__).resolve().parents[1]
GENERALIST = REPO / "models" / "speechbrain_generalist" / "CKPT+generalist"
TRAIN_HPARAMS = REPO / "configs" / "speechbrain" / "tiny_ctc.yaml"
INFERENCE_HPARAMS = REPO / "configs" / "speechbrain" / "tiny_ctc_inference.yaml"
KEPT = ["model", "normalizer"]  # the generalist's recoverables: every expert exports these
LLRD = {"decay": 0.9, "layer_pattern": r"^Transformer\.encoder\.layers\.(\d+)\."}
# the paper's LoRA where SpeechBrain's Conformer has linear or convolution modules: the
# feed-forward blocks and the convolution module, depthwise convolution included
LORA = {
    "r": 16,
    "target_modules": r"Transformer\.encoder\.layers\.\d+\.(convolution_module\.(bottleneck\.0|conv|after_conv\.2)"
    r"|ffn_module[12]\.1\.ffn\.[03])",
}
STLR = {"cut_frac": 0.1, "ratio": 32.0}


def generalist_hparams(generalist: Path) -> dict[str, Any]:
    """The architecture overrides recorded beside the generalist checkpoint."""
    return json.loads((generalist.parent / "generalist.json").read_text(encoding="utf-8"))["hparams"]


def tokenizer_file(generalist: Path) -> Path:
    return next((generalist.parent / "tokenizer").glob("*.model"))


def csv_rows(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f) - 1


def expert_hparams(plan: DemoPlan, job: ExpertJob, work_dir: Path) -> dict[str, Any]:
    """The recipe's hparams for one expert, with the fine-tuning keys MergeableBrain reads."""
    from hyperpyyaml import load_hyperpyyaml

    from speechbrain_merge.training import SlantedTriangularSchedule

    size, domain = plan.size, job.chain[-1]
    train_csv = plan.manifest(domain, "train")
    hyper = dict(job.hyper)
    # SpeechBrain counts epochs, not steps: the smoke size's step limit does not apply
    steps_per_epoch = math.ceil(csv_rows(train_csv) / size.batch_size)
    overrides = {
        **generalist_hparams(plan.generalist),
        "output_folder": str(work_dir),
        "data_root": str(plan.corpus),
        "train_csv": str(train_csv),
        "valid_csv": str(plan.manifest(domain, "dev")),
        "tokenizer_folder": str(tokenizer_file(plan.generalist).parent),
        "number_of_epochs": size.epochs,
        "batch_size": size.batch_size,
        "lr": (size.lora_lr if job.lora else size.lr) * hyper.get("lr_scale", 1.0),
        "seed": plan.seed,
    }
    if "dropout" in hyper:
        overrides["dropout"] = hyper["dropout"]
    overrides.update(plan.finetune.get("overrides") or {})  # an experiment's hparams overrides
    with open(plan.finetune.get("config") or TRAIN_HPARAMS, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    hparams.update(
        llrd=LLRD if job.llrd else None,
        stlr=SlantedTriangularSchedule(max_steps=size.epochs * steps_per_epoch, **STLR),
        export_recoverables=KEPT,
    )
    if not job.keeps_best:  # a MAcT run exports its best checkpoint after fitting instead
        hparams["export_path"] = str(work_dir / "export")
    if "weight_decay" in hyper:
        hparams["opt_class"] = functools.partial(hparams["opt_class"], weight_decay=hyper["weight_decay"])
    if job.lora:
        hparams["lora"] = LORA
    snapshots = plan.snapshot_dir(job)
    if snapshots is not None:
        hparams.update(snapshot_every_n_steps=steps_per_epoch, snapshot_dir=str(snapshots))
    return hparams


def train_expert(plan: DemoPlan, job: ExpertJob, threads: int) -> Path:
    """Fine-tune one expert in this process: the parent's weights and feature statistics,
    ``Brain.fit`` on the domain's training CSV, the exported ``CKPT+`` folder renamed
    into place (so a folder that exists is whole)."""
    import torch

    torch.set_num_threads(threads)
    work_dir = plan.out / "work" / job.name
    hparams = expert_hparams(plan, job, work_dir)
    init = plan.init_of(job)
    hparams["model"].load_state_dict(torch.load(init / "model.ckpt", map_location="cpu", weights_only=True))
    hparams["normalize"]._load(init / "normalizer.ckpt")
    brain = CTCBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                     run_opts={"device": "cpu", "noprogressbar": True}, checkpointer=hparams["checkpointer"])
    brain.tokenizer = hparams["tokenizer"].sp
    train = csv_dataset(hparams["train_csv"], hparams, brain.tokenizer)
    if job.keeps_best:
        # MAcT: validate every epoch (checkpoints carry the dev WER), export the best
        valid = csv_dataset(hparams["valid_csv"], hparams, brain.tokenizer)
        brain.fit(hparams["epoch_counter"], train, valid, train_loader_kwargs=hparams["train_dataloader_opts"],
                  valid_loader_kwargs=hparams["valid_dataloader_opts"])
        brain.checkpointer.recover_if_possible(min_key="WER")
        brain.hparams.export_path = str(work_dir / "export")  # Brain keeps its own copy of hparams
        brain.export_expert()
    else:
        # no validation set: the demo evaluates every model on the test sets afterwards
        brain.fit(hparams["epoch_counter"], train, None, train_loader_kwargs=hparams["train_dataloader_opts"])
    return publish_export(work_dir / "export", plan.expert_path(job))


def publish_export(export_dir: Path, dest: Path) -> Path:
    """The run's exported ``CKPT+`` folder renamed to ``dest`` (so a folder that exists is whole)."""
    exported = max(export_dir.glob("CKPT+*"), key=os.path.getmtime)
    dest.parent.mkdir(parents=True, exist_ok=True)
    publish(exported, dest)
    return dest


def dev_options(plan: DemoPlan) -> dict[str, Any]:
    """How a checkpoint folder of the demo is decoded: the inference hparams with the
    generalist's architecture and tokenizer, and the corpus as ``$data_root``."""
    return {
        "hparams": str(INFERENCE_HPARAMS),
        "hparams_overrides": {**generalist_hparams(plan.generalist), "tokenizer_file": str(tokenizer_file(plan.generalist))},
        "data_root": str(plan.corpus),
    }


def evaluate_demo(plan: DemoPlan, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
    """The demo's evaluation with the generalist's architecture and tokenizer."""
    return evaluate({**config, **dev_options(plan)})


SPEECHBRAIN = DemoToolkit(
    name="speechbrain",
    generalist=GENERALIST,
    prefix="CKPT+",
    suffix="",
    train_expert=train_expert,
    evaluate=evaluate_demo,
    dev_options=dev_options,
    experiment=REPO / "configs" / "experiments" / "demo_speechbrain.yaml",
    fingerprint={"hparams": TRAIN_HPARAMS.read_text(encoding="utf-8"), "llrd": LLRD, "lora": LORA, "stlr": STLR},
)
