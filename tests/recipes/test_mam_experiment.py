"""``recipes/mam_experiment``: the whole MAM / L-MAM experiment at its smallest, on the
smoke corpus: real HuBERT CTC training through SpeechBrain, a real BERT, mam recipes,
greedy CTC decoding, fine-tuning with and without L-MAM."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.recipes.test_pretrain_generalist import smoke_corpus  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mam_experiment_reports_every_row(smoke_corpus, tmp_path):  # noqa: F811
    pytest.importorskip("speechbrain")
    out = tmp_path / "mam"
    cmd = [sys.executable, str(REPO / "recipes" / "mam_experiment" / "run.py"), str(smoke_corpus), str(out),
           "--epochs", "1", "--bert-steps", "5", "--finetune-epochs", "1", "--lambdas", "0.1", "--vocab-size", "40"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["zero_shot"]][:2] == ["M_t (no merge)", "MAM all layers, lambda 0.1"]
    assert len(results["zero_shot"]) == 1 + 1 + 2 + 2 and len(results["finetuned"]) == 3
    assert sorted(results["swd_ranking"]) == [0, 1, 2, 3]
    for row in results["zero_shot"] + results["finetuned"]:
        assert all(math.isfinite(w) and w >= 0 for w in row["wer"].values())
    lambdas = results["lmam_lambdas"]
    assert len(lambdas) == 4 * 3 * 2 and all(0 < v < 1 for v in lambdas.values())
    # a merged CKPT+ folder: the target's tensors, only the mapped attention changed
    import torch

    (target,) = (out / "generalist" / "save").glob("CKPT+*")
    before = torch.load(target / "model.ckpt", weights_only=True)
    after = torch.load(out / "mam" / "CKPT+all-0.1" / "model.ckpt", weights_only=True)
    assert list(after) == list(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attention." in k and k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj") for k in changed)
    assert "| FT |" in (out / "results.md").read_text()
