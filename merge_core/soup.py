"""Greedy selective merging (SMAcT, seed 002's Algorithm 1) and greedy model soups.

Candidates (checkpoints fine-tuned from one generalist) are tried one at a time: the
uniform average of the kept set plus the candidate is evaluated on a dev subset, and
the candidate is kept only if that dev WER strictly drops. ``order: by_dev_wer`` first
sorts the candidates by their own dev WER (Wortsman et al.'s greedy soup).

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
``CKPT+``, safetensors) with the same provenance as ``asr-merge merge``. Adapters
register their dev evaluator per checkpoint kind with :func:`register_dev_evaluator`.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from merge_core.checkpoint import CheckpointReader
from merge_core.engine import MERGE, Inputs, MergeResult, _check_finite, _compute_dtype, open_inputs, plan_actions, write_stream
from merge_core.engine import _tensor_record as engine_tensor_record
from merge_core.errors import EvaluationError, RecipeError
from merge_core.evaluation.cache import write_atomically
from merge_core.evaluation.text import TextNormalization
from merge_core.manifests import Utterance
from merge_core.recipe import Recipe, _choice, _integer, load_yaml_config

METHOD = "greedy_soup"
ORDERS = ("given", "by_dev_wer")
DEFAULTS: Mapping[str, Any] = {"order": "given"}
SUBSETS = ("first", "random")

StateDict = dict[str, torch.Tensor]
Evaluate = Callable[[StateDict], float]


# ---------------------------------------------------------------------------
# the algorithm


@dataclass(frozen=True)
class Trial:
    """One evaluation of the greedy loop: ``index`` 0 is the first candidate alone."""

    index: int
    candidate: str
    wer: float  # dev WER of the kept set plus this candidate, as a fraction
    kept: bool
    best_wer: float  # running best after this trial
    members: int  # size of the kept set after this trial


@dataclass
class Selection:
    """What :func:`greedy_select` chose: the kept candidates, every trial, the soup."""

    kept: list[str]
    trials: list[Trial]
    state: StateDict
    wer: float
    individual: dict[str, float] = field(default_factory=dict)  # by_dev_wer: each candidate alone


@dataclass
class RunningSoup:
    """The uniform average of a growing set, kept as a running sum.

    ``fixed`` tensors (integer buffers, excluded names) are taken from the template
    unchanged, never averaged; averaged ones are cast back to ``dtypes`` (the
    template's) as the engine does.
    """

    fixed: Mapping[str, torch.Tensor]
    dtypes: Mapping[str, torch.dtype]
    total: StateDict = field(default_factory=dict)
    count: int = 0

    def with_candidate(self, tensors: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
        """``(sum with the candidate, the model it averages to)``; the soup itself is
        unchanged until :meth:`keep` (inputs may be read-only memory maps)."""
        total = {n: t + self.total[n] for n, t in tensors.items()} if self.count else dict(tensors)
        merged = {n: (t / (self.count + 1)).to(self.dtypes[n]) for n, t in total.items()}
        return total, {**self.fixed, **merged}

    def keep(self, total: StateDict) -> None:
        """Adopt the sum returned by :meth:`with_candidate`."""
        self.total, self.count = total, self.count + 1


def _checked_wer(wer: float, candidate: str) -> float:
    if math.isnan(wer):
        raise EvaluationError(f"dev WER is NaN with {candidate}: the dev subset has no reference words")
    return wer


def greedy_select(
    candidates: Sequence[str],
    load: Callable[[str], Mapping[str, torch.Tensor]],
    evaluate: Evaluate,
    soup: RunningSoup,
    *,
    first_wer: float | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> Selection:
    """Seed 002's Algorithm 1 (SMAcT) over ``candidates`` in the order given.

    .. code-block:: text

        Algorithm 1 Selective model merging algorithm (SMAcT)
        Require: Set of candidate models {M_0, M_1, ..., M_{n-1}}
        initial ensemble E = {M_0}, WER_prev = WER_{M_0}
        1: for M_i in {M_1, M_2, ..., M_{n-1}} do
        2:   if WER_{E u {M_i}} < WER_prev then
        3:     E = E u {M_i}
        4:     WER_prev = WER_{E u {M_i}}
        5:   end if
        6: end for
        7: return Final merged model W_E

    W_E is the uniform average of E's members. ``load(candidate)`` gives the averaged
    tensors of one candidate in the compute dtype (only one candidate is held at a
    time besides the running sum); ``evaluate(state_dict)`` its dev WER. ``first_wer``:
    M_0's WER when already known (``by_dev_wer`` measured it). ``on_trial`` sees each
    :class:`Trial` as it happens (logging, progress).
    """
    if not candidates:
        raise RecipeError("greedy selection needs at least one candidate")
    first = candidates[0]
    total, state = soup.with_candidate(load(first))
    soup.keep(total)
    best = _checked_wer(evaluate(state) if first_wer is None else first_wer, first)
    kept, trials = [first], [Trial(0, first, best, True, best, 1)]
    if on_trial:
        on_trial(trials[0])
    for index, candidate in enumerate(candidates[1:], start=1):
        total, trial_state = soup.with_candidate(load(candidate))
        wer = _checked_wer(evaluate(trial_state), candidate)
        keep = wer < best  # strictly: a tie would add a member without evidence that it helps
        if keep:
            soup.keep(total)
            kept.append(candidate)
            best, state = wer, trial_state
        trials.append(Trial(index, candidate, wer, keep, best, len(kept)))
        if on_trial:
            on_trial(trials[-1])
    return Selection(kept=kept, trials=trials, state=state, wer=best)


def individual_wers(
    candidates: Sequence[str], load: Callable[[str], Mapping[str, torch.Tensor]], evaluate: Evaluate, soup: RunningSoup
) -> dict[str, float]:
    """Each candidate's own dev WER (its "soup" of one)."""
    return {c: _checked_wer(evaluate(RunningSoup(soup.fixed, soup.dtypes).with_candidate(load(c))[1]), c) for c in candidates}


def sorted_by_wer(wers: Mapping[str, float]) -> list[str]:
    """Candidates by ascending dev WER; ties keep the given order (``sorted`` is stable)."""
    return sorted(wers, key=wers.__getitem__)


def select(
    candidates: Sequence[str],
    load: Callable[[str], Mapping[str, torch.Tensor]],
    evaluate: Evaluate,
    soup: RunningSoup,
    order: str = "given",
    on_trial: Callable[[Trial], None] | None = None,
) -> Selection:
    """Algorithm 1 over ``candidates`` in the given order, or (``by_dev_wer``) sorted
    by each one's own dev WER first, best first: Wortsman et al.'s greedy soup with
    Algorithm 1's strict-drop rule."""
    if order not in ORDERS:
        raise RecipeError(f"parameter 'order' must be one of {', '.join(ORDERS)}; got {order!r}")
    if order == "given":
        return greedy_select(candidates, load, evaluate, soup, on_trial=on_trial)
    wers = individual_wers(candidates, load, evaluate, soup)
    ranked = sorted_by_wer(wers)
    selection = greedy_select(ranked, load, evaluate, soup, first_wer=wers[ranked[0]], on_trial=on_trial)
    selection.individual = wers
    return selection


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
        if max_utterances is not None and (_integer("dev.max_utterances", max_utterances) < 1):
            raise RecipeError(f"dev.max_utterances must be at least 1, got {max_utterances}")
        batch_size = _integer("dev.batch_size", common.get("batch_size", 16))
        if batch_size < 1:
            raise RecipeError(f"dev.batch_size must be at least 1, got {batch_size}")
        try:
            normalization = TextNormalization.from_mapping(common.get("normalization"))
        except EvaluationError as e:
            raise RecipeError(f"dev: {e}") from None
        return cls(
            manifest=Path(common["manifest"]),
            log=Path(common.get("log") or f"{output}.trials.json"),
            max_utterances=max_utterances,
            subset=_choice(*SUBSETS)("dev.subset", common.get("subset", "first")),
            seed=_integer("dev.seed", common.get("seed", 0)),
            batch_size=batch_size,
            device=str(common.get("device", "auto")),
            normalization=normalization,
            options=raw,
        )


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
        order = _choice(*ORDERS)("order", parameters.get("order", DEFAULTS["order"]))
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


# (template reader, dev set) -> evaluate(state_dict) -> WER as a fraction
EvaluatorFactory = Callable[[CheckpointReader, DevSet], Evaluate]
_EVALUATORS: dict[str, EvaluatorFactory] = {}


def register_dev_evaluator(kind: str, factory: EvaluatorFactory) -> None:
    """Register how a checkpoint ``kind``'s model is scored on a dev set; the factory
    restores the template's model once and returns the per-trial ``evaluate``.
    Adapters call it on import, without importing their toolkit."""
    _EVALUATORS[kind] = factory


def dev_evaluator(template: CheckpointReader, dev: DevSet) -> Evaluate:
    """The registered evaluator for the template's checkpoint kind."""
    if template.kind not in _EVALUATORS:
        known = ", ".join(sorted(_EVALUATORS)) or "none (install asr-merge[nemo] or asr-merge[speechbrain])"
        raise RecipeError(
            f"{template.path}: {METHOD} evaluates the template's model, and no dev evaluator knows checkpoint kind "
            f"{template.kind!r} (known: {known}); give 'base_model' a .nemo file or a SpeechBrain CKPT+ folder"
        )
    return _EVALUATORS[template.kind](template, dev)


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
                _check_finite(tensor, reader, name)
            tensors[name] = tensor.to(_compute_dtype([tensor]))
        return tensors

    return load


def template_soup(recipe: Recipe, template: CheckpointReader) -> tuple[RunningSoup, list[str]]:
    """An empty soup over the template's names and the list of averaged names: integer
    buffers and excluded tensors are the template's (the engine's rule)."""
    actions = plan_actions(recipe, template)
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


def _tensor_record(recipe: Recipe, inputs: Inputs, selection: Selection) -> dict[str, Any]:
    """The engine's record of merged and copied tensors, plus what was selected."""
    record = engine_tensor_record(recipe, inputs, plan_actions(recipe, inputs.template))
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
    output.parent.mkdir(parents=True, exist_ok=True)
    with open_inputs(candidates) as inputs:
        evaluate = dev_evaluator(inputs.template, recipe.dev)
        soup, merged = template_soup(candidates, inputs.template)
        names = [m.model for m in candidates.models]
        log = TrialLog(recipe, progress)
        try:
            load = candidate_loader(candidates, inputs, merged)
            selection = select(names, load, log.counting(evaluate), soup, recipe.order, log)
        finally:
            log.close()
        log.write(individual=selection.individual, kept=selection.kept, dev_wer=selection.wer)
        print(render_curve(selection))
        tensors = _tensor_record(candidates, inputs, selection)
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
    return MergeResult(
        output=output,
        files=files,
        merged=tensors["merged"],
        copied=len(inputs.template.keys()) - tensors["merged"],
        seconds=time.perf_counter() - start,
        provenance=record,
    )
