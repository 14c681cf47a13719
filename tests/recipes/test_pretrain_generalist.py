"""``recipes/pretrain_generalist``: each script trains a real model on the smoke corpus
for one epoch and writes a generalist the demo can load, with its WER beside it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from merge_core.app.corpus import prepare_synthetic_corpus

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "recipes" / "pretrain_generalist"


@pytest.fixture(scope="module")
def smoke_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    prepare_synthetic_corpus(out, size="smoke", seed=0, progress=False)
    return out


def pretrain(script: str, corpus: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(SCRIPTS / script), str(corpus), str(out), "--epochs", "1", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{\n"):])


def assert_wers(summary: dict) -> None:
    assert set(summary["wer"]) == {"test-clean", "test-other"}
    assert all(math.isfinite(w) and w >= 0 for w in summary["wer"].values())


@pytest.mark.slow
def test_nemo_generalist_restores(smoke_corpus, tmp_path):
    pytest.importorskip("nemo.collections.asr")
    from nemo.collections.asr.models import ASRModel

    out = tmp_path / "models" / "generalist.nemo"
    summary = pretrain("pretrain_nemo.py", smoke_corpus, out)
    assert_wers(summary)
    assert json.loads(out.with_suffix(".json").read_text()) == summary
    model = ASRModel.restore_from(str(out), map_location="cpu")
    assert sum(p.numel() for p in model.parameters()) == summary["parameters"]
    assert model.cfg.encoder.d_model == 128 and model.tokenizer.vocab_size <= 128
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".pretrain-")]


@pytest.mark.slow
def test_speechbrain_generalist_is_a_checkpoint_folder_with_its_architecture(smoke_corpus, tmp_path):
    pytest.importorskip("speechbrain")
    import torch

    out = tmp_path / "models" / "speechbrain_generalist"
    # the smoke corpus's transcripts hold too few characters for 128 unigram pieces
    summary = pretrain("pretrain_speechbrain.py", smoke_corpus, out, "--vocab-size", "40")
    assert_wers(summary)
    assert sorted(p.name for p in (out / "CKPT+generalist").iterdir()) == ["CKPT.yaml", "model.ckpt", "normalizer.ckpt"]
    state = torch.load(out / "CKPT+generalist" / "model.ckpt", weights_only=True)
    assert sum(t.numel() for t in state.values()) == summary["parameters"]
    assert json.loads((out / "generalist.json").read_text())["hparams"]["vocab_size"] == 40
    assert [p.name for p in (out / "tokenizer").glob("*.model")] == ["40_unigram.model"]


@pytest.mark.parametrize("config", ["finetune_generalist.yaml", "generalist_inference.yaml"])
def test_the_shipped_generalists_configs_have_its_architecture_and_tokenizer(config):
    """The SpeechBrain configs users start from hold generalist.json's architecture keys
    and point at its tokenizer and checkpoint, so they build the network its weights fit."""
    import re

    folder = REPO / "models" / "speechbrain_generalist"
    architecture = json.loads((folder / "generalist.json").read_text())["hparams"]
    text = (REPO / "configs" / "speechbrain" / config).read_text()
    values = {key: re.search(rf"^{key}: *(\S+)", text, flags=re.M).group(1) for key in architecture}
    assert values == {key: str(value) for key, value in architecture.items()}
    paths = re.findall(r"^(?:tokenizer_folder|tokenizer_file|init_from): *(\S+)", text, flags=re.M)
    assert paths and all((REPO / p).exists() for p in paths)
