"""``asr-merge mact`` with SpeechBrain: real runs of the train_ctc recipe's command line
from a generalist checkpoint (``init_from``), each with its sampled hparams, the best
checkpoint by WER exported and averaged."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("speechbrain")

from merge_core.recipes.mact import MactRecipe, run_mact  # noqa: E402
from speechbrain_merge.mact import best_checkpoint  # noqa: E402

from .conftest import TRAIN_HPARAMS  # noqa: E402

KEPT = ("model.ckpt", "normalizer.ckpt", "CKPT.yaml")


def model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.ckpt", weights_only=True)


@pytest.mark.slow
def test_mact_runs_the_recipe_from_the_generalist_and_averages_the_best(sb_generalist, sb_data, tmp_path):
    base = tmp_path / "CKPT+generalist"
    base.mkdir()
    for name in KEPT:
        shutil.copy(sb_generalist.last / name, base / name)
    overrides = {"data_root": str(sb_data.data_root), "train_csv": str(sb_data.train_csv),
                 "valid_csv": str(sb_data.test_clean_csv), "tokenizer_folder": str(sb_generalist.output_folder / "tokenizer"),
                 "lr": 1e-3, "number_of_epochs": 2}
    recipe = MactRecipe.from_mapping({
        "toolkit": "speechbrain", "base_model": str(base), "runs": 2, "seed": 7,
        "ranges": {"lr_scale": [0.5, 2.0], "weight_decay": [0.0, 0.1], "dropout": [0.0, 0.2]},
        "train": {"recipe": "speechbrain_merge.recipes.train_ctc", "hparams": str(TRAIN_HPARAMS), "overrides": overrides},
        "work_dir": str(tmp_path / "runs"), "output": str(tmp_path / "CKPT+mact"),
    })
    run_mact(recipe, progress=False)
    runs = json.loads((tmp_path / "runs" / "runs.json").read_text())
    for i, run in enumerate(runs):
        folder = tmp_path / "runs" / f"run-{i}"
        saved = (folder / "hyperparams.yaml").read_text()  # the recipe saves its hparams with the overrides
        values = {k: float(v) for k, v in re.findall(r"^(lr|dropout|weight_decay): ([-+.e\d]+)", saved, re.MULTILINE)}
        assert values == pytest.approx({"lr": 1e-3 * run["hyper"]["lr_scale"], "dropout": run["hyper"]["dropout"],
                                        "weight_decay": run["hyper"]["weight_decay"]})
        best = Path(run["best"])
        assert sorted(p.name for p in best.iterdir()) == sorted(KEPT)
        chosen = best_checkpoint(folder / "save")
        assert all(torch.equal(v, model(chosen)[k]) for k, v in model(best).items())
        # the run started from the generalist: its first checkpoint is one epoch away from it
        first = min((folder / "save").glob("CKPT+*"))
        start_distance = sum((model(first)[k] - model(base)[k]).norm() for k in model(base))
        scratch_distance = sum(model(base)[k].norm() for k in model(base))
        assert start_distance < 0.5 * scratch_distance
    merged = model(tmp_path / "CKPT+mact")
    bests = [model(Path(r["best"])) for r in runs]
    assert all(torch.allclose(merged[k], (bests[0][k] + bests[1][k]) / 2, atol=1e-6) for k in merged)
