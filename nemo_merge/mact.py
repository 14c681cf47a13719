"""NeMo's MAcT runs (``asr-merge mact`` with ``toolkit: nemo``, :mod:`merge_core.recipes.mact`):
each run is ``python -m nemo_merge.finetune`` with the recipe's fine-tuning config, the
generalist as ``init_from_nemo_model`` and the sampled hyper-parameters as overrides.

.. code-block:: yaml

    train:
      config: configs/nemo/finetune_expert.yaml   # the fine-tuning config, as run alone
      overrides:                                  # Hydra key=value, as on its command line
        - model.train_ds.manifest_filepath=data/accented/train.json
        - model.validation_ds.manifest_filepath=data/accented/dev.json
        - trainer.max_epochs=8

The run validates on ``model.validation_ds`` and keeps its best model by the config's
``ExportBestExpert`` callback (added at ``<run>/expert_best.nemo`` when the config has
none). The hyper-parameters map to: ``lr_scale`` x ``model.optim.lr``,
``model.optim.weight_decay``, the encoder's ``dropout`` and ``dropout_att`` (through
``model_overrides``, NeMo's ``override_config_path``) and SpecAugment's ``time_width``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from merge_core.errors import RecipeError
from merge_core.recipes.mact import Hyper, MactRecipe

EXPORT_BEST = "nemo_merge.callbacks.ExportBestExpert"


def mact_overrides(cfg: DictConfig, hyper: dict[str, float]) -> dict[str, Any]:
    """A MAcT run's sampled hyper-parameters as config keys (see the module docstring);
    keys of hyper-parameters that were not sampled are left as the config has them."""
    from nemo.collections.asr.models import ASRModel

    model: dict[str, Any] = {"optim": {}}
    if "lr_scale" in hyper:
        model["optim"]["lr"] = cfg.model.optim.lr * hyper["lr_scale"]
    if "weight_decay" in hyper:
        model["optim"]["weight_decay"] = hyper["weight_decay"]
    if "spec_augment" in hyper:
        generalist_spec = ASRModel.restore_from(str(cfg.init_from_nemo_model), return_config=True).spec_augment
        model["spec_augment"] = {**OmegaConf.to_container(generalist_spec), "time_width": hyper["spec_augment"]}
    encoder = {key: hyper[name] for name, key in (("dropout", "dropout"), ("attention_dropout", "dropout_att")) if name in hyper}
    return {"model": model, **({"model_overrides": {"encoder": encoder}} if encoder else {})}


def run_config(recipe: MactRecipe, hyper: Hyper, run_dir: Path) -> tuple[DictConfig, Path]:
    """The run's full fine-tuning config and where its best model is exported."""
    train = recipe.train
    if not train.get("config"):
        raise RecipeError("train.config: the NeMo fine-tuning config (e.g. configs/nemo/finetune_expert.yaml) is missing")
    cfg = OmegaConf.merge(OmegaConf.load(train["config"]), OmegaConf.from_dotlist(list(train.get("overrides") or [])))
    cfg.name = run_dir.name
    cfg.output_dir = str(run_dir)
    cfg.init_from_nemo_model = str(Path(recipe.base_model).resolve())
    cfg.init_from_pretrained_model = None
    callbacks = list(cfg.trainer.get("callbacks") or [])
    if not any(c.get("_target_") == EXPORT_BEST for c in callbacks):
        callbacks.append({"_target_": EXPORT_BEST, "path": str(run_dir / "expert_best.nemo"), "monitor": "val_wer"})
    cfg.trainer.callbacks = callbacks
    cfg = OmegaConf.merge(cfg, mact_overrides(cfg, dict(hyper)))
    best = next(c.path for c in cfg.trainer.callbacks if c.get("_target_") == EXPORT_BEST)
    return cfg, Path(best)


def train_run(recipe: MactRecipe, index: int, hyper: Hyper, run_dir: Path) -> Path:
    """One run through NeMo's entry point in a child process; its config is kept as ``<run>/run.yaml``."""
    cfg, best = run_config(recipe, hyper, run_dir)
    OmegaConf.save(cfg, run_dir / "run.yaml")
    command = [sys.executable, "-m", "nemo_merge.finetune", f"--config-path={run_dir.resolve()}", "--config-name=run"]
    with open(run_dir / "train.log", "w", encoding="utf-8") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"MAcT run {index} failed (exit {done.returncode}); its log: {run_dir / 'train.log'}")
    return best
