"""Pre-train the tiny NeMo generalist that the demo ships, on the corpus's original domain.

    asr-merge make-corpus data/corpus --size default
    python recipes/pretrain_generalist/pretrain_nemo.py data/corpus models/nemo_generalist.nemo

What NeMo's ``speech_to_text_ctc_bpe.py`` does with a freshly trained tokenizer, in one
script: SentencePiece BPE on the ``train-clean-100`` transcripts, the FastConformer
CTC-BPE of ``configs/nemo/fastconformer_ctc_bpe_tiny.yaml`` (sizes overridable with
``key=value``, as on NeMo's command line), CPU or GPU training under a cosine schedule,
then WER on ``test-clean`` and ``test-other`` written beside the ``.nemo`` as
``<name>.json``. The ``.nemo`` is written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import open_dict

from merge_core.atomic import publish
from merge_core.app.corpus import prepare_librispeech
from merge_core.atomic import write_text_atomically
from nemo_merge.evaluate import evaluate
from nemo_merge.models import build_model, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
MODEL_CONFIG = REPO / "configs" / "nemo" / "fastconformer_ctc_bpe_tiny.yaml"
# the generalist the demo ships: bigger than the test model, still a few MB
GENERALIST_SIZE = ("model.encoder.d_model=128", "model.encoder.n_layers=4")
TEST_SETS = ("test-clean", "test-other")


def manifests(corpus: Path, out: Path) -> dict[str, Path]:
    """NeMo manifests of the original domain's four splits, by split name."""
    written = prepare_librispeech(corpus / "LibriSpeech", out, toolkit="nemo")
    return {split: paths["nemo"] for split, paths in written.items()}


def transcripts(manifest: Path) -> list[str]:
    """The ``text`` of every line of a NeMo manifest."""
    return [json.loads(line)["text"] for line in manifest.read_text(encoding="utf-8").splitlines() if line]


def train(args: argparse.Namespace, data: dict[str, Path], work: Path):
    """Tokenizer, model and training; returns the trained model."""
    tokenizer = train_tokenizer(transcripts(data["train-clean-100"]), work / "tokenizer", args.vocab_size)
    model = build_model(MODEL_CONFIG, tokenizer, [*GENERALIST_SIZE, *args.overrides], seed=args.seed)
    steps_per_epoch = -(-len(transcripts(data["train-clean-100"])) // args.batch_size)
    with open_dict(model.cfg):
        model.cfg.train_ds.manifest_filepath = str(data["train-clean-100"])
        model.cfg.train_ds.batch_size = args.batch_size
        model.cfg.validation_ds.manifest_filepath = str(data["dev-clean"])
        model.cfg.optim.lr = args.lr
        model.cfg.optim.weight_decay = 1e-3
        model.cfg.optim.sched.warmup_steps = None
        model.cfg.optim.sched.warmup_ratio = 0.05
        model.cfg.optim.sched.max_steps = steps_per_epoch * args.epochs
    model.setup_training_data(model.cfg.train_ds)
    model.setup_validation_data(model.cfg.validation_ds)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=True,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=max(1, args.epochs // 5),
        default_root_dir=str(work),
    )
    model.set_trainer(trainer)
    model.setup_optimization(model.cfg.optim)
    trainer.fit(model)
    return model.cpu()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", type=Path, help="the corpus folder (holding LibriSpeech/)")
    p.add_argument("out", type=Path, help="the generalist .nemo to write")
    p.add_argument("overrides", nargs="*", help="model config overrides, e.g. model.encoder.d_model=96")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--vocab-size", type=int, default=128, help="BPE tokens")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pl.seed_everything(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # beside the output, so that publishing it is a rename on one file system
    with tempfile.TemporaryDirectory(prefix=".pretrain-", dir=args.out.parent) as tmp:
        work = Path(tmp)
        data = manifests(args.corpus, work / "manifests")
        model = train(args, data, work)
        staged = work / "generalist.nemo"
        model.save_to(str(staged))
        report, _ = evaluate(
            {
                "models": [{"name": "generalist", "model": str(staged)}],
                "manifests": {s: str(data[s]) for s in TEST_SETS},
                "forgetting_sets": list(TEST_SETS),
                "output_dir": str(work / "eval"),
                "cache": False,
            }
        )
        publish(staged, args.out)
        summary = {
            "model": args.out.name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": args.epochs,
            "train_utterances": len(transcripts(data["train-clean-100"])),
            "wer": report["models"][0]["wer"],
            "command": " ".join(["python", "recipes/pretrain_generalist/pretrain_nemo.py", *(argv or sys.argv[1:])]),
        }
    write_text_atomically(args.out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
