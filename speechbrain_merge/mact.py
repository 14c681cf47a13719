"""SpeechBrain's MAcT runs (``asr-merge mact`` with ``toolkit: speechbrain``,
:mod:`merge_core.recipes.mact`): each run is the recipe's own command line,
``python -m <recipe> <hparams> --output_folder=<run> --init_from=<base_model> --seed=<seed + i>``
plus the recipe's overrides and the sampled hyper-parameters as ``--key=value``.

.. code-block:: yaml

    train:
      recipe: speechbrain_merge.recipes.train_ctc     # python -m <recipe> <hparams> --key=value
      hparams: configs/speechbrain/tiny_ctc.yaml
      overrides: {data_root: data, train_csv: accented/train.csv, valid_csv: accented/dev.csv,
                  tokenizer_folder: models/speechbrain_generalist/tokenizer, lr: 0.001, number_of_epochs: 8}
      hyper_keys: {lr_scale: lr, weight_decay: weight_decay, dropout: dropout}   # the default
      save_folder: save                               # relative to the run's output_folder

The recipe must accept ``init_from`` (a ``CKPT+`` folder to start from), validate every
epoch and save checkpoints with a ``WER`` meta, as ``train_ctc`` does; the run's best
checkpoint by ``WER`` is exported as ``<run>/CKPT+best`` with the recoverables the base
model has (what ``asr-merge merge`` averages). ``lr_scale`` multiplies
``overrides[hyper_keys.lr_scale]``; every other hyper-parameter sets its hparams key.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from merge_core.atomic import discard, publish, temp_path
from merge_core.errors import RecipeError
from merge_core.recipes.mact import Hyper, MactRecipe
from speechbrain_merge.checkpoint_io import META_FILE, PARAM_SUFFIX

HYPER_KEYS = {"lr_scale": "lr", "weight_decay": "weight_decay", "dropout": "dropout"}


def run_overrides(recipe: MactRecipe, index: int, hyper: Hyper, run_dir: Path) -> dict[str, object]:
    """The run's hparams overrides: the recipe's, the sampled values, where and from what it trains."""
    train = recipe.train
    overrides = dict(train.get("overrides") or {})
    keys = dict(train.get("hyper_keys") or HYPER_KEYS)
    for name, value in hyper:
        if name not in keys:
            raise RecipeError(f"ranges.{name}: train.hyper_keys names no hparams key for it ({keys}); "
                              "add one or leave it out of 'ranges'")
        key = keys[name]
        if name == "lr_scale":
            if key not in overrides:
                raise RecipeError(f"ranges.lr_scale scales train.overrides.{key}: set it")
            overrides[key] = float(overrides[key]) * value
        else:
            overrides[key] = value
    overrides.update(output_folder=str(run_dir.resolve()), init_from=str(Path(recipe.base_model).resolve()),
                     seed=recipe.seed + index)
    return overrides


def best_checkpoint(save_folder: Path) -> Path:
    """The checkpoint of ``save_folder`` with the lowest ``WER`` meta, as the Checkpointer finds it."""
    from speechbrain.utils.checkpoints import Checkpointer

    best = Checkpointer(save_folder).find_checkpoint(min_key="WER")
    if best is None:
        raise RuntimeError(f"{save_folder}: no checkpoint with a WER meta (does the recipe validate every epoch?)")
    return Path(best.path)


def export_best(best: Path, base_model: Path, dest: Path) -> Path:
    """``best``'s recoverables that the base model has, and its meta file, as the folder ``dest``."""
    names = [p.name for p in base_model.iterdir() if p.suffix == PARAM_SUFFIX]
    missing = [n for n in names if not (best / n).is_file()]
    if missing:
        raise RuntimeError(f"{best}: the best checkpoint lacks {missing}, which the base model {base_model} has")
    tmp = temp_path(dest)
    tmp.mkdir(parents=True)
    try:
        for name in [*names, META_FILE]:
            shutil.copy2(best / name, tmp / name)
        publish(tmp, dest)
    finally:
        discard(tmp)
    return dest


def train_run(recipe: MactRecipe, index: int, hyper: Hyper, run_dir: Path) -> Path:
    """One run through the recipe's command line in a child process (log in ``<run>/train.log``)."""
    train = recipe.train
    if not train.get("recipe") or not train.get("hparams"):
        raise RecipeError("train.recipe (a module run with python -m) and train.hparams are both needed")
    overrides = run_overrides(recipe, index, hyper, run_dir)
    command = [sys.executable, "-m", train["recipe"], str(train["hparams"]), *(f"--{k}={v}" for k, v in overrides.items())]
    with open(run_dir / "train.log", "w", encoding="utf-8") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"MAcT run {index} failed (exit {done.returncode}); its log: {run_dir / 'train.log'}")
    best = best_checkpoint(run_dir / train.get("save_folder", "save"))
    return export_best(best, Path(recipe.base_model), run_dir / "CKPT+best")
