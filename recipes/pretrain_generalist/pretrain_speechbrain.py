"""Pre-train the tiny SpeechBrain generalist that the demo ships, on the corpus's original domain.

    asr-merge make-corpus data/corpus --size default
    python recipes/pretrain_generalist/pretrain_speechbrain.py data/corpus models/speechbrain_generalist

The recipe of ``configs/speechbrain/tiny_ctc.yaml`` (``speechbrain_merge.recipes.train_ctc``,
a plain ``Brain.fit`` with NewBob annealing) at the sizes of :data:`GENERALIST_HPARAMS`,
on the ``train-clean-100`` CSV, validated on ``dev-clean``. The output folder is what
the demo and ``asr-merge eval`` need: ``CKPT+generalist/`` (the best checkpoint's
``model`` and ``normalizer``), ``tokenizer/`` and ``generalist.json`` with the hparams
overrides that rebuild the architecture and the WER on ``test-clean``/``test-other``.
It is written in a scratch folder and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from merge_core.atomic import publish
from merge_core.app.corpus import prepare_librispeech
from speechbrain_merge.evaluate import evaluate

REPO = Path(__file__).resolve().parents[2]
TRAIN_HPARAMS = REPO / "configs" / "speechbrain" / "tiny_ctc.yaml"
INFERENCE_HPARAMS = REPO / "configs" / "speechbrain" / "tiny_ctc_inference.yaml"
# architecture keys shared by the training and inference hparams
GENERALIST_HPARAMS = {"d_model": 96, "nhead": 4, "num_encoder_layers": 3, "d_ffn": 384, "vocab_size": 128}
KEPT = ("model", "normalizer")  # what a generalist and its experts hold: weights and feature statistics
TEST_SETS = ("test-clean", "test-other")


def architecture(args: argparse.Namespace) -> dict[str, int]:
    """The hparams overrides that build the generalist, for training and inference alike."""
    return {**GENERALIST_HPARAMS, "vocab_size": args.vocab_size}


def best_checkpoint(save_folder: Path) -> Path:
    """The run's checkpoint of lowest validation WER."""
    from speechbrain.utils.checkpoints import Checkpointer

    return Checkpointer(save_folder).find_checkpoint(min_key="WER").path


def train(args: argparse.Namespace, csvs: dict[str, Path], run_dir: Path) -> Path:
    """A real ``Brain.fit`` of the recipe; returns the best checkpoint folder."""
    from hyperpyyaml import load_hyperpyyaml

    from speechbrain_merge.recipes.train_ctc import fit

    overrides = {
        **architecture(args),
        "output_folder": str(run_dir),
        "data_root": str(args.corpus),
        "train_csv": str(csvs["train-clean-100"]),
        "valid_csv": str(csvs["dev-clean"]),
        "number_of_epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "avg_checkpoints": 1,
    }
    with open(TRAIN_HPARAMS, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    fit(hparams, {"device": args.device, "noprogressbar": False})
    return best_checkpoint(run_dir / "save")


def package(checkpoint: Path, tokenizer: Path, dest: Path) -> None:
    """``dest``: the checkpoint's kept recoverables and the tokenizer."""
    (dest / "CKPT+generalist").mkdir(parents=True)
    for name in (*(f"{k}.ckpt" for k in KEPT), "CKPT.yaml"):
        shutil.copy2(checkpoint / name, dest / "CKPT+generalist" / name)
    (dest / "tokenizer").mkdir()
    for piece in (*tokenizer.glob("*.model"), *tokenizer.glob("*.vocab")):
        shutil.copy2(piece, dest / "tokenizer" / piece.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", type=Path, help="the corpus folder (holding LibriSpeech/)")
    p.add_argument("out", type=Path, help="the generalist folder to write")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vocab-size", type=int, default=GENERALIST_HPARAMS["vocab_size"], help="unigram tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    args.corpus = args.corpus.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # beside the output, so that publishing it is a rename on one file system
    with tempfile.TemporaryDirectory(prefix=".pretrain-", dir=args.out.parent) as tmp:
        work = Path(tmp)
        written = prepare_librispeech(args.corpus / "LibriSpeech", work / "manifests", toolkit="speechbrain")
        csvs = {split: paths["speechbrain"] for split, paths in written.items()}
        checkpoint = train(args, csvs, work / "run")
        staged = work / "generalist"
        package(checkpoint, work / "run" / "tokenizer", staged)
        tokenizer = next((staged / "tokenizer").glob("*.model"))
        report, _ = evaluate({
            "hparams": str(INFERENCE_HPARAMS),
            "hparams_overrides": {**architecture(args), "tokenizer_file": str(tokenizer)},
            "models": [{"name": "generalist", "model": str(staged / "CKPT+generalist")}],
            "manifests": {s: str(csvs[s]) for s in TEST_SETS},
            "forgetting_sets": list(TEST_SETS),
            "output_dir": str(work / "eval"),
            "cache": False,
        })
        summary = {
            "hparams": architecture(args),
            "parameters": sum(t.numel() for t in _state(staged / "CKPT+generalist" / "model.ckpt").values()),
            "epochs": args.epochs,
            "train_utterances": sum(1 for _ in csvs["train-clean-100"].open()) - 1,
            "wer": report["models"][0]["wer"],
            "command": " ".join(["python", "recipes/pretrain_generalist/pretrain_speechbrain.py", *(argv or sys.argv[1:])]),
        }
        (staged / "generalist.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        publish(staged, args.out)
    print(json.dumps(summary, indent=2))
    return 0


def _state(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


if __name__ == "__main__":
    raise SystemExit(main())
