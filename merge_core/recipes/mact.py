"""MAcT and SMAcT: R fine-tunings of one generalist with hyper-parameters sampled from
ranges, each keeping its best dev-WER model, then merged (Ducorroy and Riad, "Robust fine-tuning of speech recognition models via model merging: application to disordered speech").

    asr-merge mact RECIPE.yaml key=value ...

.. code-block:: yaml

    toolkit: nemo                        # or speechbrain
    base_model: models/nemo_generalist.nemo
    runs: 4
    seed: 0                              # of the sampling (and of each SpeechBrain run)
    ranges:                              # uniform; default Ducorroy and Riad's (see RANGES) for what the toolkit maps
      lr_scale: [0.6, 1.6]               # x the training config's learning rate
      weight_decay: [0.07, 0.2]
      dropout: [0.0, 0.1]
      attention_dropout: [0.0, 0.1]
      spec_augment: [0.0, 0.1]           # SpecAugment's time-mask width, as a fraction
    train: {...}                         # the toolkit's own training (its adapter's mact module)
    merge: average                       # MAcT; greedy_soup: SMAcT (Algorithm 1), with `dev`
    dev: {manifest: dev.json, max_utterances: 200}   # greedy_soup's dev section
    work_dir: outputs/mact               # run-<i>/ per run, runs.json
    output: outputs/mact/mact.nemo

Every run goes through the toolkit's training entry point in its own process (NeMo:
its fine-tuning script; SpeechBrain: ``python -m <recipe> <hparams>``) with
the sampled values as config overrides, validates on its dev set, and keeps its best
checkpoint. A run whose ``run.json`` records the same hyper-parameters and whose best
checkpoint exists is not trained again. The merge is :func:`merge_core.engine.merge`'s
``average`` of the runs' best models (MAcT), or :func:`merge_core.recipes.greedy_soup.run_greedy_soup`
over them in run order (SMAcT).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from merge_core.atomic import write_text_atomically
from merge_core.engine import MergeResult, merge
from merge_core.errors import RecipeError
from merge_core.plugins import ToolkitUnavailableError, toolkit
from merge_core.recipes.config import load_yaml_config
from merge_core.recipes.greedy_soup import METHOD as SOUP_METHOD
from merge_core.recipes.greedy_soup import SoupRecipe, run_greedy_soup
from merge_core.recipes.merge import Recipe
from merge_core.recipes.validate import integer, pathname
from merge_core.registry import recipe_kind

# Ducorroy and Riad's ranges: the learning rate as a factor of the training config's
RANGES: Mapping[str, tuple[float, float]] = {
    "lr_scale": (0.6, 1.6),
    "weight_decay": (0.07, 0.2),
    "dropout": (0.0, 0.1),
    "attention_dropout": (0.0, 0.1),
    "spec_augment": (0.0, 0.1),
}
METHOD = "mact"
MERGES = ("average", SOUP_METHOD)

Hyper = tuple[tuple[str, float], ...]


def sample_hyperparameters(rng: random.Random, ranges: Mapping[str, tuple[float, float]] = RANGES) -> Hyper:
    """One run's hyper-parameters, each uniform in its range.

    >>> sample_hyperparameters(random.Random(0), {"dropout": (0.0, 0.1)})
    (('dropout', 0.084442),)
    """
    return tuple((key, round(rng.uniform(low, high), 6)) for key, (low, high) in ranges.items())


def _ranges(raw: Any) -> dict[str, tuple[float, float]]:
    if not isinstance(raw, Mapping):
        raise RecipeError(f"recipe key 'ranges' must map hyper-parameters to [low, high], got {raw!r}")
    ranges = {}
    for key, value in raw.items():
        if key not in RANGES:
            raise RecipeError(f"ranges.{key}: unknown hyper-parameter; known: {', '.join(RANGES)}")
        if (not isinstance(value, Sequence) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) or value[0] > value[1]):
            raise RecipeError(f"ranges.{key} must be [low, high] with low <= high, got {value!r}")
        ranges[key] = (float(value[0]), float(value[1]))
    return ranges


@recipe_kind(METHOD, defaults={"runs": 4, "merge": "average"}, about="fine-tunes first: asr-merge mact", listed=False)
@dataclass(frozen=True)
class MactRecipe:
    """A validated ``asr-merge mact`` recipe (see the module docstring)."""

    toolkit: str
    base_model: str
    runs: int
    seed: int
    ranges: dict[str, tuple[float, float]]
    train: dict[str, Any]
    merge: str
    dev: dict[str, Any] | None
    work_dir: Path
    output: str
    method: str = METHOD

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | DictConfig) -> "MactRecipe":
        if isinstance(raw, DictConfig):
            raw = OmegaConf.to_container(raw, resolve=True)
        raw = dict(raw)
        if raw.pop("method", METHOD) != METHOD:
            raise RecipeError(f"a MAcT recipe has method: {METHOD} (or none)")
        missing = [k for k in ("toolkit", "base_model", "train", "output") if not raw.get(k)]
        if missing:
            raise RecipeError(f"recipe key(s) {missing} missing")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            known = ", ".join(cls.__dataclass_fields__)
            raise RecipeError(f"unknown recipe key(s) {sorted(map(str, unknown))}; known: {known}")
        paths = {key: pathname(key, raw[key]) for key in ("base_model", "output", "work_dir") if raw.get(key)}
        if raw.get("dev") and not isinstance(raw["dev"], Mapping):
            raise RecipeError(f"recipe key 'dev' must be a mapping (at least 'manifest'), got {raw['dev']!r}")
        try:
            toolkit(str(raw["toolkit"]))
        except ToolkitUnavailableError as e:
            raise RecipeError(f"recipe key 'toolkit': {e}") from None
        if not Path(paths["base_model"]).exists():
            raise RecipeError(f"base_model: {raw['base_model']} does not exist")
        runs = integer("runs", raw.get("runs", 4))
        if runs < 1:
            raise RecipeError(f"recipe key 'runs' must be at least 1, got {runs}")
        how = raw.get("merge", "average")
        if how not in MERGES:
            raise RecipeError(f"recipe key 'merge' must be one of {', '.join(MERGES)}, got {how!r}")
        if how == SOUP_METHOD and not raw.get("dev"):
            raise RecipeError(f"merge: {SOUP_METHOD} selects by dev WER: give a 'dev' section (at least 'manifest')")
        if not isinstance(raw["train"], Mapping):
            raise RecipeError(f"recipe key 'train' must be a mapping, got {raw['train']!r}")
        return cls(
            toolkit=raw["toolkit"],
            base_model=paths["base_model"],
            runs=runs,
            seed=integer("seed", raw.get("seed", 0)),
            ranges=_ranges(raw.get("ranges", dict(RANGES))),
            train=dict(raw["train"]),
            merge=how,
            dev=dict(raw["dev"]) if raw.get("dev") else None,
            work_dir=Path(paths.get("work_dir") or Path(paths["output"]).parent / "mact_runs"),
            output=paths["output"],
        )

    def run(self, *, progress: bool = True) -> MergeResult:
        """:func:`run_mact` with the toolkit's own training runs."""
        return run_mact(self, progress=progress)

    def sampled(self) -> list[Hyper]:
        """Every run's hyper-parameters, the same for the same seed and ranges."""
        rng = random.Random(self.seed)
        return [sample_hyperparameters(rng, self.ranges) for _ in range(self.runs)]


def load_mact_recipe(path: str | Path, overrides: Sequence[str] = ()) -> MactRecipe:
    """Read a MAcT recipe YAML, apply ``key=value`` overrides, validate; errors name the file."""
    try:
        return MactRecipe.from_mapping(load_yaml_config(path, overrides, "MAcT recipe"))
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


# (recipe, run index, hyper-parameters, run folder) -> the run's best checkpoint
TrainRun = Callable[[MactRecipe, int, Hyper, Path], Path]


def trainer_for(name: str) -> TrainRun:
    """The ``train_run`` of the toolkit plugin ``name`` (:mod:`merge_core.plugins`)."""
    plugin = toolkit(name)
    return plugin.load(plugin.train_run, "MAcT's fine-tuning runs")


def finished_run(run_dir: Path, hyper: Hyper) -> Path | None:
    """The best checkpoint of an earlier run with the same hyper-parameters, if it exists."""
    record = run_dir / "run.json"
    if not record.is_file():
        return None
    done = json.loads(record.read_text(encoding="utf-8"))
    best = Path(done["best"])
    return best if done["hyper"] == dict(hyper) and best.exists() else None


def train_runs(recipe: MactRecipe, train_run: TrainRun, progress: bool = True) -> list[Path]:
    """Each run's best checkpoint, training the runs not already finished."""
    bests = []
    for i, hyper in enumerate(tqdm(recipe.sampled(), desc="MAcT runs", unit="run", disable=not progress)):
        run_dir = recipe.work_dir / f"run-{i}"
        best = finished_run(run_dir, hyper)
        if best is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            best = train_run(recipe, i, hyper, run_dir)
            if not best.exists():
                raise RuntimeError(f"MAcT run {i} ({run_dir}) ended without its best checkpoint {best}")
            write_text_atomically(run_dir / "run.json", json.dumps({"hyper": dict(hyper), "best": str(best)}, indent=2) + "\n")
        bests.append(best)
    return bests


def run_mact(recipe: MactRecipe, train_run: TrainRun | None = None, progress: bool = True) -> MergeResult:
    """Train the runs (:func:`train_runs`), record them in ``<work_dir>/runs.json`` and
    write their ``average`` (MAcT) or greedy soup (SMAcT) to ``output``."""
    start = time.perf_counter()
    bests = train_runs(recipe, train_run or trainer_for(recipe.toolkit), progress)
    runs = [{"run": i, "hyper": dict(h), "best": str(b)} for i, (h, b) in enumerate(zip(recipe.sampled(), bests))]
    write_text_atomically(recipe.work_dir / "runs.json", json.dumps(runs, indent=2) + "\n")
    models = [str(b) for b in bests]
    if recipe.merge == SOUP_METHOD:
        soup = {"method": SOUP_METHOD, "base_model": recipe.base_model, "models": models, "dev": recipe.dev,
                "output": recipe.output}
        result = run_greedy_soup(SoupRecipe.from_mapping(soup), progress=progress)
    else:
        average = {"method": "average", "base_model": recipe.base_model, "models": models, "output": recipe.output}
        result = merge(Recipe.from_mapping(average), progress=progress)
    summary = f"{recipe.merge} of {recipe.runs} runs' best models; runs in {recipe.work_dir / 'runs.json'}"
    return replace(result, seconds=time.perf_counter() - start, summary=summary)
