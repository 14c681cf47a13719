"""Real NeMo fixtures, built once per session in a temporary folder.

- ``nemo_audio_manifest``: espeak-ng speech (two voices) and the NeMo JSONL manifest
  listing it; half the ``audio_filepath`` entries relative to the manifest's folder.
- ``tiny_tokenizer_dir``: a SentencePiece BPE tokenizer trained on generated English.
- ``tiny_nemo_base``: a ``.nemo`` of the tiny FastConformer-CTC-BPE, freshly initialized.
- ``tiny_nemo_experts``: two ``.nemo`` experts fine-tuned from the base by a real
  Lightning ``Trainer`` on the manifest, with different seeds and learning rates.
- ``nemo_finetune_manifests``: the audio manifest under the two names NeMo's
  fine-tuning script accepts.

The pieces they are built from (the config, tokenizer, utterances, sentence generator
and CPU trainer) live in :mod:`nemo_merge.testing`, which the benchmarks share; they are
imported here so that test modules can keep importing them from this one.

Fixtures needing NeMo skip when it is not installed (``pip install -e ".[nemo]"``),
those needing audio when espeak-ng is not (``apt-get install espeak-ng sox``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nemo_merge.testing import (  # noqa: F401  (re-exported for the test modules)
    SPEED,
    TINY_CONFIG,
    TOKENIZER_VOCAB,
    UTTERANCES,
    cpu_trainer,
    english_sentences,
    ensure_tokenizer,
    save_nemo,
    write_speech_manifest,
)

# (seed, learning rate) of each expert: different data order, dither and step size
EXPERTS = [(1, 1e-3), (2, 3e-3)]
EXPERT_STEPS = 2


@pytest.fixture(scope="session")
def nemo_audio_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a NeMo manifest (``manifest.json``, one JSON object a line: ``audio_filepath``,
    ``duration``, ``text``) over ``audio/utt{i}.wav``: 16 kHz mono speech by espeak-ng.
    Even lines give the audio path relative to the manifest's folder, odd lines absolute."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng sox)")
    root = tmp_path_factory.mktemp("nemo_data")
    return write_speech_manifest(root / "manifest.json", UTTERANCES, relative_even=True)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a SentencePiece BPE tokenizer (at most 96 pieces) for ``tokenizer.dir``."""
    pytest.importorskip("nemo.collections.asr")
    return ensure_tokenizer(tmp_path_factory.mktemp("nemo_tokenizer"))


@pytest.fixture(scope="session")
def tiny_nemo_base(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Path of ``base.nemo``: the tiny FastConformer-CTC-BPE config, initialized with seed 0."""
    from nemo_merge.models import build_model

    model = build_model(TINY_CONFIG, tiny_tokenizer_dir, seed=0)
    return save_nemo(model, tmp_path_factory.mktemp("nemo_base") / "base.nemo")


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
