"""Inputs the NeMo benchmarks build once and cache: a tokenizer and ``.nemo`` files.

The tokenizer is the test suite's (``tests/nemo_merge/conftest.py``): SentencePiece
BPE trained locally by :func:`nemo_merge.models.train_tokenizer` on the same generated
English, so the benchmarks build real NeMo models exactly as the tests do. Every file
is written under a temporary name and renamed into place, so an interrupted build
leaves nothing a later run would take for finished.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def import_nemo_quietly() -> None:
    """Import NeMo's ASR collection and keep its log to errors: every ``restore_from``
    otherwise warns about the data loaders a benchmark never sets up."""
    import nemo.collections.asr  # noqa: F401
    from nemo.utils import logging

    logging.setLevel(logging.ERROR)


def tiny_config() -> Path:
    """The tiny FastConformer-CTC-BPE config the tests build their models from."""
    # the tests' fixtures module imports pytest: only the builders import it, never a measured child
    from tests.nemo_merge.conftest import TINY_CONFIG

    return TINY_CONFIG


def ensure_tokenizer(folder: Path) -> Path:
    """The tests' SentencePiece tokenizer in ``folder/tokenizer``, trained on first use."""
    from nemo_merge.models import train_tokenizer
    from tests.nemo_merge.conftest import TOKENIZER_VOCAB, english_sentences

    final = folder / "tokenizer"
    if not (final / "tokenizer.model").is_file():
        partial = folder / "tokenizer.partial"
        shutil.rmtree(partial, ignore_errors=True)
        train_tokenizer(english_sentences(), partial, vocab_size=TOKENIZER_VOCAB)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    return final


def save_nemo(model: Any, path: Path) -> Path:
    """``model.save_to(path)`` by way of a temporary name (NeMo wants a ``.nemo`` suffix)."""
    partial = path.with_name(path.stem + ".partial.nemo")
    model.save_to(str(partial))
    os.replace(partial, path)
    return path
