"""The ``greedy_soup`` recipe: greedy selective merging (SMAcT) scored on a toolkit's dev set.

The selection itself is :mod:`merge_core.selection` (Algorithm 1, and the greedy soup's
order by each candidate's own dev WER); this module reads the recipe, scores each trial
with the dev evaluator of the template's toolkit, logs every trial and writes the soup.

.. code-block:: yaml

    method: greedy_soup
    base_model: generalist.nemo        # optional template (config, tokenizer, copied tensors); default: models[0]
    models: [run1.nemo, run2.nemo, run3.nemo]
    parameters: {order: given}         # given | by_dev_wer
    exclude: ["preprocessor.*"]
    dev:
      manifest: dev.json               # the toolkit's own format: NeMo JSONL or SpeechBrain CSV
      max_utterances: 200              # null: the whole manifest
      subset: first                    # first (the first N) | random (seeded sample, kept in manifest order)
      seed: 0
      log: outputs/soup.trials.json    # default: <output>.trials.json
      batch_size: 16
      device: auto
      normalization: {lowercase: true, strip_punctuation: true}
      # toolkit keys: decoding (NeMo); hparams, hparams_overrides, interface, data_root (SpeechBrain)
    output: outputs/soup.nemo

Merging is in memory: a running sum of the kept members' tensors makes a trial one
add and one divide per tensor, and the model the adapter restored once takes each
trial's weights with ``load_state_dict``. The selected soup is written by the engine's
:func:`~merge_core.engine.write_stream`, so it is the same kind of output (``.nemo``,
``CKPT+``, safetensors) with the same provenance as ``asr-merge merge``. Toolkit
plugins name their dev evaluator per checkpoint kind (:mod:`merge_core.plugins`).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from merge_core.atomic import write_atomically
from merge_core.checkpoint import CheckpointReader, kinds
from merge_core.engine import MERGE, Inputs, MergeResult, check_finite, compute_dtype, open_inputs, plan_actions, tensor_record, write_stream
from merge_core.errors import EvaluationError, RecipeError
from merge_core.evaluation.manifests import Utterance
from merge_core.evaluation.text import TextNormalization
from merge_core.evaluation.wer import WerStats
from merge_core.plugins import toolkits
from merge_core.recipes.config import load_yaml_config
from merge_core.recipes.merge import Recipe
from merge_core.recipes.validate import choice, integer, pathname
from merge_core.registry import recipe_kind
from merge_core.selection import ORDERS, Evaluate, RunningSoup, Selection, StateDict, Trial, select

METHOD = "greedy_soup"
DEFAULTS: Mapping[str, Any] = {"order": "given"}
SUBSETS = ("first", "random")


# ---------------------------------------------------------------------------
# the recipe


@dataclass(frozen=True)
class DevSet:
    """The ``dev`` section: what the candidates are scored on and where trials are logged.

    ``options`` are the toolkit's own keys, checked by its evaluator.
    """

    manifest: Path
    log: Path
    max_utterances: int | None = None
    subset: str = "first"
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    normalization: TextNormalization = field(default_factory=TextNormalization)
    options: Mapping[str, Any] = field(default_factory=dict)

    def choose(self, utterances: list[Utterance]) -> list[Utterance]:
        """The dev subset: the first ``max_utterances``, or a seeded sample of them
        kept in manifest order (so batches, hence padding, do not depend on the seed's draw order)."""
        n = self.max_utterances
        if n is None or n >= len(utterances):
            return utterances
        if self.subset == "first":
            return utterances[:n]
        picked = sorted(random.Random(self.seed).sample(range(len(utterances)), n))
        return [utterances[i] for i in picked]

    def resolved_device(self) -> str:
        """``device``, with ``auto`` meaning CUDA when torch sees a GPU."""
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("normalization", "options")},
            "manifest": str(self.manifest),
            "log": str(self.log),
            "normalization": asdict(self.normalization),
            **dict(self.options),
        }

    @classmethod
    def from_mapping(cls, raw: Any, output: str) -> "DevSet":
        if not isinstance(raw, Mapping) or not raw.get("manifest"):
            raise RecipeError("recipe key 'dev' must be a mapping with at least 'manifest' (the dev set)")
        raw = dict(raw)
        common = {k: raw.pop(k) for k in list(raw) if k in cls.__dataclass_fields__ and k != "options"}
        max_utterances = common.get("max_utterances")
        if max_utterances is not None and (integer("dev.max_utterances", max_utterances) < 1):
            raise RecipeError(f"dev.max_utterances must be at least 1, got {max_utterances}")
        batch_size = integer("dev.batch_size", common.get("batch_size", 16))
        if batch_size < 1:
            raise RecipeError(f"dev.batch_size must be at least 1, got {batch_size}")
        try:
            normalization = TextNormalization.from_mapping(common.get("normalization"))
        except EvaluationError as e:
            raise RecipeError(f"dev: {e}") from None
        return cls(
            manifest=Path(pathname("dev.manifest", common["manifest"])),
            log=Path(pathname("dev.log", common["log"]) if common.get("log") else f"{output}.trials.json"),
            max_utterances=max_utterances,
            subset=choice(*SUBSETS)("dev.subset", common.get("subset", "first")),
            seed=integer("dev.seed", common.get("seed", 0)),
            batch_size=batch_size,
            device=str(common.get("device", "auto")),
            normalization=normalization,
            options=raw,
        )


@recipe_kind(METHOD, defaults=DEFAULTS, about="needs a 'dev' section: see merge_core.recipes.greedy_soup")
@dataclass(frozen=True)
class SoupRecipe:
    """A validated ``method: greedy_soup`` recipe: the candidates as an ``average``
    recipe (so inputs, patterns and output are checked as for any merge), the order
    and the dev set."""

    candidates: Recipe
    order: str
    dev: DevSet
    method: str = METHOD

    @property
    def output(self) -> str:
        return self.candidates.output

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as stored in provenance records."""
        record = self.candidates.to_dict()
        for key in ("include_base", "base_weight"):
            record.pop(key)
        return {**record, "method": METHOD, "parameters": {"order": self.order}, "dev": self.dev.to_dict()}

    def run(self, *, progress: bool = True) -> MergeResult:
        """:func:`run_greedy_soup`."""
        return run_greedy_soup(self, progress=progress)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | DictConfig) -> "SoupRecipe":
        if isinstance(raw, DictConfig):
            raw = OmegaConf.to_container(raw, resolve=True)
        raw = dict(raw)
        if raw.get("method") != METHOD:
            raise RecipeError(f"recipe key 'method' must be {METHOD!r} here, got {raw.get('method')!r}")
        parameters = raw.pop("parameters", None) or {}
        if not isinstance(parameters, Mapping) or set(parameters) - set(DEFAULTS):
            raise RecipeError(f"parameters: method {METHOD!r} accepts only: {', '.join(DEFAULTS)}; got {parameters!r}")
        for key in ("include_base", "base_weight", "overrides"):
            if key in raw:
                raise RecipeError(f"recipe key {key!r} is not meaningful for {METHOD!r} (list the base in 'models' to try it)")
        if "dev" not in raw:
            raise RecipeError(f"recipe key 'dev' is required by {METHOD!r} (the dev set the candidates are scored on)")
        dev = raw.pop("dev")
        candidates = Recipe.from_mapping({**raw, "method": "average"})
        weighted = [i for i, m in enumerate(candidates.models) if m.weight != 1.0]
        if weighted:
            raise RecipeError(f"models[{weighted[0]}].weight: a greedy soup is a uniform average; remove the weights")
        names = [m.model for m in candidates.models]
        if len(set(names)) != len(names):
            raise RecipeError("models: a candidate is listed twice")
        order = choice(*ORDERS)("order", parameters.get("order", DEFAULTS["order"]))
        return cls(candidates, order, DevSet.from_mapping(dev, candidates.output))


def load_soup_recipe(path: str | Path, overrides: Sequence[str] = ()) -> SoupRecipe:
    """Read a ``greedy_soup`` recipe YAML, apply ``key=value`` overrides, validate;
    errors name the file."""
    config = load_yaml_config(path, overrides)
    try:
        return SoupRecipe.from_mapping(config)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------
# dev evaluators: one per checkpoint kind, registered by the adapters


class DevEvaluator(Protocol):
    """What a toolkit's dev evaluator offers: a model restored once from the template,
    scored on one dev subset with each trial's weights."""

    def __call__(self, state: StateDict) -> float:
        """The dev WER (a fraction) with ``state``'s weights loaded."""

    def stats(self, state: StateDict) -> WerStats:
        """The edit counts behind that WER (pooled exactly across sets by summing them)."""


# (template reader, dev set, shared=None) -> DevEvaluator; ``shared``: an evaluator of the
# same factory whose restored model the new one uses (several dev sets, one model)
EvaluatorFactory = Callable[..., DevEvaluator]


def dev_evaluator(
    template: CheckpointReader, dev: DevSet, shared: DevEvaluator | None = None, *, purpose: str = METHOD
) -> DevEvaluator:
    """The dev evaluator of the toolkit whose plugin scores the template's checkpoint kind
    (``shared``: another of its evaluators, whose restored model it reuses)."""
    for plugin in toolkits().values():
        if template.kind in plugin.dev_evaluators:
            factory: EvaluatorFactory = plugin.load(plugin.dev_evaluators[template.kind], f"{purpose}'s dev evaluation")
            return factory(template, dev) if shared is None else factory(template, dev, shared=shared)
    scored = [kind for plugin in toolkits().values() for kind in plugin.dev_evaluators]
    describes = {k.name: k.describes for k in kinds()}
    wanted = " or ".join(describes.get(k, k) for k in scored) or "a checkpoint of an installed toolkit"
    known = ", ".join(scored) or "none: install a toolkit's extra, e.g. pip install 'asr-merge[nemo]'"
    raise RecipeError(
        f"{template.path}: {purpose} evaluates the template's model, and no dev evaluator knows checkpoint kind "
        f"{template.kind!r} (known: {known}); give 'base_model' {wanted}"
    )


# ---------------------------------------------------------------------------
# running a recipe


def candidate_loader(recipe: Recipe, inputs: Inputs, merged: list[str]) -> Callable[[str], StateDict]:
    """``load(path)``: one candidate's averaged tensors in the compute dtype, checked
    for NaN/Inf as the engine checks them."""
    readers = {m.model: reader for m, reader in zip(recipe.models, inputs.models)}

    def load(candidate: str) -> StateDict:
        reader = readers[candidate]
        tensors = {}
        for name in merged:
            tensor = reader.get(name)
            if not recipe.allow_nonfinite:
                check_finite(tensor, reader, name)
            tensors[name] = tensor.to(compute_dtype([tensor]))
        return tensors

    return load


def template_soup(actions: Mapping[str, str], template: CheckpointReader) -> tuple[RunningSoup, list[str]]:
    """An empty soup over the template's names and the list of averaged names: integer
    buffers and excluded tensors are the template's (the engine's rule, in ``actions``)."""
    merged = [n for n, a in actions.items() if a == MERGE]
    fixed = {n: template.get(n) for n, a in actions.items() if a != MERGE}
    return RunningSoup(fixed, {n: template.spec(n).dtype for n in template.keys()}), merged


class TrialLog:
    """The trial log as JSON, rewritten atomically after every trial (an interrupted
    run leaves a readable log), and a tqdm bar over dev evaluations."""

    def __init__(self, recipe: SoupRecipe, progress: bool) -> None:
        self.path = recipe.dev.log
        self.recipe = recipe.to_dict()
        self.trials: list[Trial] = []
        n = len(recipe.candidates.models)
        # by_dev_wer scores each candidate alone, then n - 1 trials (M_0's WER is known)
        total = 2 * n - 1 if recipe.order == "by_dev_wer" else n
        self.bar = tqdm(total=total, desc=METHOD, unit="eval", disable=not progress)

    def counting(self, evaluate: Evaluate) -> Evaluate:
        """``evaluate`` advancing the bar."""

        def counted(state: StateDict) -> float:
            wer = evaluate(state)
            self.bar.update()
            return wer

        return counted

    def __call__(self, trial: Trial) -> None:
        self.trials.append(trial)
        self.bar.set_postfix(best_wer=f"{100 * trial.best_wer:.2f}%", kept=trial.members)
        self.write()

    def write(self, **extra: Any) -> None:
        record = {"recipe": self.recipe, "trials": [asdict(t) for t in self.trials], **extra}
        write_atomically(self.path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8"))

    def close(self) -> None:
        self.bar.close()


def render_curve(selection: Selection) -> str:
    """The selection curve as a text table, one row per trial."""
    rows = [f"{'trial':>5}  {'dev WER %':>9}  {'kept':>4}  {'best %':>7}  {'members':>7}  candidate"]
    for t in selection.trials:
        rows.append(
            f"{t.index:>5}  {100 * t.wer:>9.2f}  {'yes' if t.kept else 'no':>4}  {100 * t.best_wer:>7.2f}  {t.members:>7}  {t.candidate}"
        )
    return "\n".join(rows)


def _tensor_record(inputs: Inputs, actions: dict[str, str], selection: Selection) -> dict[str, Any]:
    """The engine's record of merged and copied tensors, plus what was selected."""
    record = tensor_record(inputs, actions)
    trials = [asdict(t) for t in selection.trials]
    return {**record, "selection": {"kept": selection.kept, "dev_wer": selection.wer, "trials": trials}}


def _roles(recipe: Recipe, inputs: Inputs, kept: list[str]) -> list[tuple[str, CheckpointReader, float | None]]:
    """The template, and each candidate as kept (weight 1) or rejected (weight 0)."""
    roles: list[tuple[str, CheckpointReader, float | None]] = [("base", inputs.base, None)] if inputs.base else []
    return roles + [("model", r, 1.0 if m.model in kept else 0.0) for m, r in zip(recipe.models, inputs.models)]


def _stream(state: StateDict) -> Callable[[list[str]], Iterator[tuple[str, torch.Tensor]]]:
    return lambda order: ((name, state[name]) for name in order)


def run_greedy_soup(recipe: SoupRecipe, *, progress: bool = True) -> MergeResult:
    """Run a ``greedy_soup`` recipe: restore the template's model once, select by
    Algorithm 1 with in-memory trials, log every trial, print the curve, and write
    the selected soup as ``asr-merge merge`` writes a merge (atomically, with provenance)."""
    start = time.perf_counter()
    candidates = recipe.candidates
    output = Path(candidates.output)
    with open_inputs(candidates) as inputs:
        evaluate = dev_evaluator(inputs.template, recipe.dev)
        output.parent.mkdir(parents=True, exist_ok=True)  # only once the inputs are known good
        actions = plan_actions(candidates, inputs.template)
        soup, merged = template_soup(actions, inputs.template)
        names = [m.model for m in candidates.models]
        log = TrialLog(recipe, progress)
        try:
            load = candidate_loader(candidates, inputs, merged)
            selection = select(names, load, log.counting(evaluate), soup, recipe.order, log)
        finally:
            log.close()
        log.write(individual=selection.individual, kept=selection.kept, dev_wer=selection.wer)
        print(render_curve(selection))
        tensors = _tensor_record(inputs, actions, selection)
        files, record = write_stream(
            output,
            recipe.to_dict(),
            _roles(candidates, inputs, selection.kept),
            inputs.template,
            tensors,
            _stream(selection.state),
            hash_inputs=candidates.hash_inputs,
            shard_size=candidates.shard_size,
        )
    summary = (
        f"greedy soup of {len(selection.kept)} of {len(candidates.models)} candidates, "
        f"dev WER {100 * selection.wer:.2f}%; trials in {recipe.dev.log}"
    )
    return MergeResult.of_stream(output, (files, record), tensors, actions, start, summary)
