"""``asr-merge mact`` with NeMo: real runs of ``python -m nemo_merge.finetune`` from the
tiny generalist, each with its sampled hyper-parameters, best models averaged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("nemo")

from omegaconf import OmegaConf  # noqa: E402

from tests.checkpoint_helpers import read_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mact_trains_each_run_with_its_sample_and_averages_the_best(tmp_path, tiny_nemo_base, nemo_finetune_manifests):
    train, dev = nemo_finetune_manifests
    data = {"batch_size": 4, "num_workers": 0, "pin_memory": False}
    overrides = [f"model.train_ds.manifest_filepath={train}", f"model.validation_ds.manifest_filepath={dev}",
                 *(f"model.{split}.{k}={v}" for split in ("train_ds", "validation_ds") for k, v in data.items()),
                 "model.optim.lr=0.01", "trainer.max_steps=2", "trainer.val_check_interval=2",
                 "trainer.enable_progress_bar=false", "exp_manager=null"]
    recipe = {
        "toolkit": "nemo", "base_model": str(tiny_nemo_base), "runs": 2, "seed": 5,
        "train": {"config": str(REPO / "configs" / "nemo" / "finetune_expert.yaml"), "overrides": overrides},
        "work_dir": str(tmp_path / "runs"), "output": str(tmp_path / "mact.nemo"),
    }
    path = tmp_path / "mact.yaml"
    path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "merge_core.app.cli", "mact", str(path), "-q"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    runs = json.loads((tmp_path / "runs" / "runs.json").read_text())
    assert len(runs) == 2 and runs[0]["hyper"] != runs[1]["hyper"]
    for run in runs:
        hyper, cfg = run["hyper"], OmegaConf.load(Path(run["best"]).parent / "run.yaml")
        assert cfg.model.optim.lr == pytest.approx(0.01 * hyper["lr_scale"])
        assert cfg.model.optim.weight_decay == hyper["weight_decay"]
        assert cfg.model_overrides.encoder == {"dropout": hyper["dropout"], "dropout_att": hyper["attention_dropout"]}
        assert cfg.model.spec_augment.time_width == hyper["spec_augment"]
        assert cfg.init_from_nemo_model == str(tiny_nemo_base)
    bests = [read_weights(Path(r["best"])) for r in runs]
    merged, base = read_weights(tmp_path / "mact.nemo"), read_weights(tiny_nemo_base)
    assert list(merged) == list(base)
    moved = [k for k in base if base[k].is_floating_point() and not torch.equal(bests[0][k], base[k])]
    assert moved
    for name in moved:
        assert torch.allclose(merged[name], (bests[0][name] + bests[1][name]) / 2, atol=1e-6)
    mtimes = [Path(r["best"]).stat().st_mtime_ns for r in runs]
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [Path(r["best"]).stat().st_mtime_ns for r in runs] == mtimes  # finished runs are not trained again
