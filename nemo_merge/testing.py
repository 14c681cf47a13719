"""Tiny real NeMo models, their tokenizer and speech: what the tests and the benchmarks both build.

The test suite's fixtures (``tests/nemo_merge/conftest.py``) and the NeMo benchmarks
(``python -m benchmarks.<name>``) build the same things: the tiny FastConformer-CTC-BPE
of :data:`TINY_CONFIG`, a SentencePiece BPE tokenizer of at most :data:`TOKENIZER_VOCAB`
pieces trained locally on :func:`english_sentences`, espeak-ng speech of
:data:`UTTERANCES` at :data:`SPEED` words per minute listed in a NeMo manifest, and
short CPU fine-tuning runs (:func:`cpu_trainer`).

Importing this module imports neither NeMo, Lightning nor pytest: each function imports
what it needs when called. Files are written under a temporary name and renamed into
place, so an interrupted build leaves nothing a later run would take for finished.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merge_core.atomic import write_atomically, write_text_atomically

#: The tiny FastConformer-CTC-BPE config, in the source tree beside this package.
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "nemo" / "fastconformer_ctc_bpe_tiny.yaml"
#: Upper bound on the tokenizer's pieces (the generated English yields a few fewer).
TOKENIZER_VOCAB = 96
#: espeak-ng words per minute: slower than its 175 so that, after 8x subsampling, every
#: utterance has comfortably more encoder frames than BPE tokens, as CTC needs.
SPEED = 130

#: ``(text, espeak-ng voice)``: short, varied, lower case, as an English CTC model's targets.
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

# the word lists english_sentences draws from
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
    """Varied lower-case English sentences, the same for the same seed.

    Parameters
    ----------
    count : int
        How many sentences (at least the spoken utterances' number).
    seed : int
        Seed of the draws.

    Returns
    -------
    list of str
        The texts of :data:`UTTERANCES` first, so that every word the model hears is seen
        by the tokenizer, then sentences of a subject, a verb, an object and (seven times
        in ten) a place drawn from small word lists.
    """
    rng = random.Random(seed)
    lines = [text for text, _ in UTTERANCES]
    while len(lines) < count:
        parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
        if rng.random() < 0.7:
            parts.append(rng.choice(PLACES))
        lines.append(" ".join(parts))
    return lines


def import_nemo_quietly() -> None:
    """Import NeMo's ASR collection and keep its log to errors.

    Every ``restore_from`` otherwise warns about the data loaders that a test or a
    benchmark never sets up.
    """
    import nemo.collections.asr  # noqa: F401
    from nemo.utils import logging

    logging.setLevel(logging.ERROR)


def ensure_tokenizer(folder: Path) -> Path:
    """The tests' SentencePiece tokenizer in ``folder/tokenizer``, trained on first use.

    Parameters
    ----------
    folder : Path
        Where the ``tokenizer`` folder is (or goes).

    Returns
    -------
    Path
        ``folder/tokenizer``, holding ``tokenizer.model``, ``tokenizer.vocab`` and
        ``vocab.txt``: a model's ``tokenizer.dir``. Trained by
        :func:`nemo_merge.models.train_tokenizer` on :func:`english_sentences` with at
        most :data:`TOKENIZER_VOCAB` pieces unless a previous call left it there.
    """
    from nemo_merge.models import train_tokenizer

    final = folder / "tokenizer"
    if not (final / "tokenizer.model").is_file():
        write_atomically(final, lambda tmp: train_tokenizer(english_sentences(), tmp, vocab_size=TOKENIZER_VOCAB))
    return final


def save_nemo(model: Any, path: Path) -> Path:
    """``model.save_to(path)`` by way of a temporary name.

    Parameters
    ----------
    model : nemo.core.ModelPT
        The model to save.
    path : Path
        The ``.nemo`` file to write; it appears only once complete.

    Returns
    -------
    Path
        ``path``.
    """
    write_atomically(path, lambda tmp: model.save_to(str(tmp)), suffix=".nemo")  # NeMo wants the suffix
    return path


def write_speech_manifest(
    manifest: Path, utterances: Sequence[tuple[str, str]], *, relative_even: bool = False
) -> Path:
    """Speak utterances with espeak-ng and write the NeMo manifest listing them.

    Parameters
    ----------
    manifest : Path
        The manifest to write: one JSON object a line (``audio_filepath``,
        ``duration``, ``text``), over ``audio/utt{i}.wav`` beside it (16 kHz mono, at
        :data:`SPEED` words per minute).
    utterances : sequence of (str, str)
        ``(text, espeak-ng voice)`` of each utterance, e.g. :data:`UTTERANCES`.
    relative_even : bool
        Give the audio paths of even lines relative to the manifest's folder (odd lines
        stay absolute), as manifests moved between machines do.

    Returns
    -------
    Path
        ``manifest``, written only once every audio file is.
    """
    from merge_core.app.corpus.audio import synthesize

    root = manifest.parent
    lines = []
    for i, (text, voice) in enumerate(utterances):
        wav = root / "audio" / f"utt{i}.wav"
        duration = synthesize(text, wav, voice=voice, speed=SPEED)
        audio_path = wav.relative_to(root) if relative_even and i % 2 == 0 else wav
        lines.append(json.dumps({"audio_filepath": str(audio_path), "duration": duration, "text": text}))
    write_text_atomically(manifest, "\n".join(lines) + "\n")
    return manifest


def cpu_trainer(max_steps: int, root: Path, callbacks: list | None = None) -> Any:
    """A quiet single-CPU Lightning trainer for a few steps, without validation or logging.

    Parameters
    ----------
    max_steps : int
        Optimizer steps of a ``fit``.
    root : Path
        The trainer's ``default_root_dir``.
    callbacks : list of lightning.pytorch.Callback, optional
        The trainer's callbacks.

    Returns
    -------
    lightning.pytorch.Trainer
        No logger, checkpointing, progress bar, model summary, sanity check or validation.
    """
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
