"""Real NeMo fixtures, built once per session in a temporary folder.

- ``nemo_audio_manifest``: espeak-ng speech (two voices) and the NeMo JSONL manifest
  listing it; half the ``audio_filepath`` entries relative to the manifest's folder.
- ``tiny_tokenizer_dir``: a SentencePiece BPE tokenizer trained on generated English.
- ``tiny_nemo_base``: a ``.nemo`` of the tiny FastConformer-CTC-BPE, freshly initialized.
- ``tiny_nemo_experts``: two ``.nemo`` experts fine-tuned from the base by a real
  Lightning ``Trainer`` on the manifest, with different seeds and learning rates.

Fixtures needing NeMo skip when it is not installed (``pip install -e ".[nemo]"``),
those needing audio when espeak-ng is not (``apt-get install espeak-ng sox``).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from merge_core.audio import synthesize

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "nemo" / "fastconformer_ctc_bpe_tiny.yaml"
TOKENIZER_VOCAB = 96
# words per minute: slower than espeak-ng's 175 so that, after 8x subsampling, every
# utterance has comfortably more encoder frames than BPE tokens, as CTC needs
SPEED = 130

# (text, espeak-ng voice): short, varied, lower case, as an English CTC model's targets
UTTERANCES = [
    ("the quick brown fox jumps over the dog", "en-us"),
    ("please call the office before noon", "en-gb"),
    ("merge the weights of two experts", "en-us"),
    ("the river runs past the old mill", "en-gb"),
    ("turn left at the next light", "en-us"),
    ("she reads a short book every night", "en-gb"),
    ("the weather is cold and wet today", "en-us"),
    ("speech models forget what they knew", "en-gb"),
]

# (seed, learning rate) of each expert: different data order, dither and step size
EXPERTS = [(1, 1e-3), (2, 3e-3)]
EXPERT_STEPS = 2

SUBJECTS = ["the doctor", "a pilot", "my neighbour", "the old farmer", "our teacher", "the children",
            "a young engineer", "the driver", "his sister", "the singer", "every student", "the captain"]
VERBS = ["found", "painted", "carried", "opened", "watched", "repaired", "sold", "described",
         "forgot", "measured", "cleaned", "followed", "heard", "wrote about"]
OBJECTS = ["a green bottle", "the broken window", "three heavy boxes", "the morning news",
           "a quiet river", "the yellow train", "an empty chair", "the last letter", "a small garden",
           "the long bridge", "two red apples", "the wooden door", "a strange noise", "the cold soup"]
PLACES = ["near the station", "in the kitchen", "after lunch", "before the storm", "at the market",
          "on the mountain", "during the meeting", "by the lake", "under the table", "in the evening",
          "behind the school", "at the airport"]


def english_sentences(count: int = 400, seed: int = 0) -> list[str]:
    """``count`` varied lower-case sentences, the same for the same seed: subject, verb,
    object and an optional place drawn from small word lists, plus the spoken utterances
    themselves so every word the model hears is seen by the tokenizer."""
    rng = random.Random(seed)
    lines = [text for text, _ in UTTERANCES]
    while len(lines) < count:
        parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
        if rng.random() < 0.7:
            parts.append(rng.choice(PLACES))
        lines.append(" ".join(parts))
    return lines


@pytest.fixture(scope="session")
def nemo_audio_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a NeMo manifest (``manifest.json``, one JSON object a line: ``audio_filepath``,
    ``duration``, ``text``) over ``audio/utt{i}.wav``: 16 kHz mono speech by espeak-ng.
    Even lines give the audio path relative to the manifest's folder, odd lines absolute."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng sox)")
    root = tmp_path_factory.mktemp("nemo_data")
    lines = []
    for i, (text, voice) in enumerate(UTTERANCES):
        wav = root / "audio" / f"utt{i}.wav"
        duration = synthesize(text, wav, voice=voice, speed=SPEED)
        audio_path = wav.relative_to(root) if i % 2 == 0 else wav
        lines.append(json.dumps({"audio_filepath": str(audio_path), "duration": duration, "text": text}))
    manifest = root / "manifest.json"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a SentencePiece BPE tokenizer (at most 96 pieces) for ``tokenizer.dir``."""
    pytest.importorskip("nemo.collections.asr")
    from nemo_merge.models import train_tokenizer

    out = tmp_path_factory.mktemp("nemo_tokenizer")
    return train_tokenizer(english_sentences(), out, vocab_size=TOKENIZER_VOCAB)


@pytest.fixture(scope="session")
def tiny_nemo_base(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Path of ``base.nemo``: the tiny FastConformer-CTC-BPE config, initialized with seed 0."""
    from nemo_merge.models import build_model

    model = build_model(TINY_CONFIG, tiny_tokenizer_dir, seed=0)
    path = tmp_path_factory.mktemp("nemo_base") / "base.nemo"
    model.save_to(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_nemo_experts(
    tmp_path_factory: pytest.TempPathFactory, tiny_nemo_base: Path, nemo_audio_manifest: Path
) -> list[Path]:
    """Paths of ``expert{i}.nemo``, i = 0, 1: the base after ``EXPERT_STEPS`` real training
    steps on the manifest, each expert with its own seed and learning rate."""
    folder = tmp_path_factory.mktemp("nemo_experts")
    paths = []
    for i, (seed, lr) in enumerate(EXPERTS):
        path = folder / f"expert{i}.nemo"
        fine_tune(tiny_nemo_base, nemo_audio_manifest, path, seed=seed, lr=lr, work_dir=folder)
        paths.append(path)
    return paths


def cpu_trainer(max_steps: int, root: Path, callbacks: list | None = None):
    """A quiet single-CPU Lightning trainer for a few steps, without validation or logging."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
        callbacks=callbacks or [],
    )


def fine_tune(base: Path, manifest: Path, out: Path, seed: int, lr: float, work_dir: Path) -> None:
    """Restore ``base``, train it ``EXPERT_STEPS`` steps on ``manifest``, save it to ``out``."""
    import torch
    from nemo.collections.asr.models import ASRModel
    from omegaconf import open_dict

    model = ASRModel.restore_from(str(base), map_location="cpu")
    trainer = cpu_trainer(EXPERT_STEPS, work_dir)
    # NeMo reads the scheduler's max_steps from the trainer it was given, not the one fitting it
    model.set_trainer(trainer)
    with open_dict(model.cfg):
        model.cfg.optim.lr = lr
        # no warm-up: with a 10-step warm-up two steps would barely move the weights
        model.cfg.optim.sched.warmup_steps = 0
    train_ds = {
        "manifest_filepath": str(manifest),
        "sample_rate": 16000,
        "batch_size": 4,
        "shuffle": True,
        "num_workers": 0,
        "pin_memory": False,
        "max_duration": 20.0,
        "min_duration": 0.1,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # shuffling, dither, SpecAugment and dropout all draw from it
        model.setup_training_data(train_ds)
        trainer.fit(model)
    model.save_to(str(out))


@pytest.fixture(scope="session")
def nemo_finetune_manifests(nemo_audio_manifest: Path) -> tuple[Path, Path]:
    """``(train.json, dev.json)``: the audio manifest under two names beside it (so its
    relative audio paths still resolve). NeMo's ``setup_multiple_validation_data``, which
    its fine-tuning script calls, refuses a manifest named ``manifest.json``."""
    folder = nemo_audio_manifest.parent
    paths = (folder / "train.json", folder / "dev.json")
    for path in paths:
        shutil.copyfile(nemo_audio_manifest, path)
    return paths
