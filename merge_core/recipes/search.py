"""The ``search`` recipe: the best merge under a forgetting budget (``asr-merge search``).

What an ASR team states is a budget, not a lambda: "the lowest WER on my new domains, and
LibriSpeech may get at most 1 % worse". A search draws merges of the experts (method,
per-expert weights, ``lambda``, ``density``, the original's weight, per-group lambdas)
with Optuna (Akiba et al., KDD 2019), scores each on the target domains' dev sets and on
the original domain's, and writes the merge with the lowest (weighted) mean target dev
WER whose forgetting stays within the budget.

.. code-block:: yaml

    method: search
    base_model: models/nemo_generalist.nemo          # the generalist: theta_0, the reference of forgetting
    models:                                          # the experts
      - {model: outputs/experts/accented/expert.nemo, name: accented}
      - {model: outputs/experts/noisy/expert.nemo, name: noisy}
    dev:
      sets: {accented: data/manifests/accented/dev.json, noisy: data/manifests/noisy/dev.json}
      original: {dev_clean: data/manifests/LibriSpeech/dev_clean.json}
      max_utterances: 100                            # per set (null: all); subset: first | random, seed
      batch_size: 16
      device: auto
      # the toolkit's keys, as greedy_soup's dev section: decoding (NeMo); hparams, ... (SpeechBrain)
    max_forgetting_pct: 1.0                          # relative, as the report's % Forgetting
    trials: 40
    space:                                           # keys left out take these defaults; null turns one off
      methods: [average, task_arithmetic, ties]
      weights: [0.0, 1.0]                            # each expert's weight w_i
      lambda: [0.1, 1.5]
      density: [0.1, 1.0]
      base_weight: [0.0, 4.0]                        # the original's weight in an average
      group_lambdas: {}                              # e.g. {encoder: "encoder.*", decoder: "decoder.*"}
    objective: {weights: {}}                         # per-set weights of the mean (default: all 1)
    sampler: tpe                                     # tpe | nsga2 (two objectives: WER and forgetting)
    seed: 0
    study: {storage: null, name: null}               # default: <output>.study.db, the output's name
    if_infeasible: refuse                            # refuse | least_forgetting
    exclude: ["preprocessor.*"]
    output: outputs/search.nemo

The study itself (trials, constraint, choice, log, plot) is :mod:`merge_core.search`.
A trial is cheap, as a greedy soup's is: the candidate merge is computed in memory from
the memory-mapped experts by the registered method functions
(:func:`merge_core.engine.iter_merged`), loaded into the one model the toolkit's dev
evaluator restored (``load_state_dict``), and decoded on every dev set (NeMo: features
computed once). Forgetting is Table VII's: pooled original-domain dev WER against the
generalist's, errors and words summed over the original sets (:mod:`merge_core.evaluation.report`).
Constraints are Optuna's own: ``trial.set_constraint`` (a value <= 0 is feasible), which
TPE and NSGA-II both honour. The fixed recipes (AoDE, TIES, task arithmetic, or the
recipe's ``baselines``) are enqueued first: they are the baseline every drawn merge has
to beat, and the plot marks them. Then the space's methods take turns, and the sampler
draws each method's values from that method's own earlier trials.

Outputs: the chosen merge, written by the engine like any merge with the study, the trial
and its dev numbers in its provenance; the trial log ``<output>.trials.json`` (rewritten
after every trial); the plot ``<output>.pareto.png``; and the study itself (SQLite by
default), which a rerun resumes: it counts the finished trials and runs only the rest.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from merge_core.errors import RecipeError
from merge_core.recipes.greedy_soup import DevSet
from merge_core.recipes.merge import Recipe
from merge_core.recipes.validate import choice, integer, known_keys, pathname
from merge_core.registry import MergeMethod, get_method, recipe_kind

if TYPE_CHECKING:
    from merge_core.engine import MergeResult

METHOD = "search"
SAMPLERS = ("tpe", "nsga2")
IF_INFEASIBLE = ("refuse", "least_forgetting")
DEFAULTS: Mapping[str, Any] = {"max_forgetting_pct": 1.0, "trials": 40, "sampler": "tpe", "seed": 0}
# the space when the recipe gives none; a recipe's space takes these for the keys it leaves out
DEFAULT_SPACE: Mapping[str, Any] = {
    "methods": ["average", "task_arithmetic", "ties"],
    "weights": [0.0, 1.0],
    "lambda": [0.1, 1.5],
    "density": [0.1, 1.0],
    "base_weight": [0.0, 4.0],
    "group_lambdas": {},
}
# the fixed recipes enqueued first when the recipe names none: each method at its defaults,
# every expert at weight 1 and the original left out (AoDE, the AoDE paper's TIES and TA rows)
DEFAULT_BASELINES: Mapping[str, Mapping[str, Any]] = {
    "AoDE": {"method": "average"},
    "TIES": {"method": "ties"},
    "task arithmetic": {"method": "task_arithmetic"},
}
SEARCHED = ("lambda", "density")  # the per-tensor methods' parameters a space ranges over
GROUP_NAME = re.compile(r"[A-Za-z0-9_-]+")

SEARCH_KEYS = frozenset({
    "method", "base_model", "models", "dev", "max_forgetting_pct", "trials", "space", "objective", "sampler",
    "seed", "study", "if_infeasible", "baselines", "include", "exclude", "output", "plot", "jobs",
    "allow_nonfinite", "shard_size", "hash_inputs",
})
# keys of the search's recipe that a resumed study may change: they do not change what a trial scores
RESUMABLE = ("trials", "study", "if_infeasible", "output", "plot", "jobs", "hash_inputs", "shard_size")


# ---------------------------------------------------------------------------
# the recipe


@dataclass(frozen=True)
class Range:
    """A closed interval a searched value is drawn from; ``low == high`` fixes it."""

    low: float
    high: float

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_list(self) -> list[float]:
        return [self.low, self.high]

    @classmethod
    def from_value(cls, key: str, raw: Any, *, minimum: float | None = None, above: float | None = None,
                   maximum: float | None = None) -> "Range":
        """``[low, high]`` of finite numbers with ``low <= high``, each ``>= minimum``,
        ``> above`` and ``<= maximum`` where given; errors name ``key``."""
        if not isinstance(raw, (list, tuple)) or len(raw) != 2:
            raise RecipeError(f"{key} must be a range [low, high] of two numbers, got {raw!r}")
        for value in raw:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RecipeError(f"{key} must be a range [low, high] of two finite numbers, got {raw!r}")
        low, high = float(raw[0]), float(raw[1])
        if low > high:
            raise RecipeError(f"{key} {raw!r} is empty: its low end is above its high end")
        if (minimum is not None and low < minimum) or (above is not None and low <= above):
            bound = f">= {minimum:g}" if minimum is not None else f"> {above:g}"
            raise RecipeError(f"{key} {raw!r}: values must be {bound}")
        if maximum is not None and high > maximum:
            raise RecipeError(f"{key} {raw!r}: values must be <= {maximum:g}")
        return cls(low, high)


def _optional_range(raw: Mapping[str, Any], key: str, **bounds: float) -> Range | None:
    value = raw.get(key, DEFAULT_SPACE[key])
    return None if value is None else Range.from_value(f"space.{key}", value, **bounds)


@dataclass(frozen=True)
class SearchSpace:
    """What a trial may draw: a method, and the ranges of what that method takes.

    ``weights`` ranges every expert's weight (methods that use weights), ``lam`` and
    ``density`` the methods' ``lambda`` and ``density``, ``base_weight`` the original's
    weight as a member of an average (absent: the original is left out);
    ``group_lambdas`` gives tensors matching each glob pattern a lambda of their own,
    drawn from ``lam``. A None range is not searched (the method's default, weight 1).
    """

    methods: tuple[str, ...]
    weights: Range | None
    lam: Range | None
    density: Range | None
    base_weight: Range | None
    group_lambdas: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        ranges = {"weights": self.weights, "lambda": self.lam, "density": self.density, "base_weight": self.base_weight}
        return {"methods": list(self.methods), **{k: r and r.to_list() for k, r in ranges.items()},
                "group_lambdas": dict(self.group_lambdas)}

    def searches(self, method: MergeMethod, what: str) -> bool:
        """Whether trials of ``method`` draw ``what`` (``weights``, ``lambda``, ``density``, ``base_weight``)."""
        if what == "weights":
            return self.weights is not None and method.uses_weights
        if what == "base_weight":
            return self.base_weight is not None and method.base_as_member and method.uses_weights
        return (self.lam if what == "lambda" else self.density) is not None and what in method.defaults

    @classmethod
    def from_mapping(cls, raw: Any) -> "SearchSpace":
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise RecipeError(f"recipe key 'space' must be a mapping, got {raw!r}")
        known_keys(raw, set(DEFAULT_SPACE), "space")
        methods = raw.get("methods", DEFAULT_SPACE["methods"])
        if not isinstance(methods, (list, tuple)) or not methods or not all(isinstance(m, str) for m in methods):
            raise RecipeError(f"space.methods must be a non-empty list of merge method names, got {methods!r}")
        if len(set(methods)) != len(methods):
            raise RecipeError(f"space.methods lists a method twice: {methods!r}")
        for name in methods:
            try:
                method = get_method(name)
            except RecipeError as e:
                raise RecipeError(f"space.methods: {e}") from None
            if method.needs_grams:
                raise RecipeError(f"space.methods: {name!r} merges from Gram files, which a search does not open; "
                                  "run it with asr-merge merge")
        weights = _optional_range(raw, "weights", minimum=0.0)
        if weights is not None and weights.high == 0.0:
            raise RecipeError(f"space.weights {weights.to_list()!r} gives every expert weight 0: nothing would be merged")
        lam = _optional_range(raw, "lambda")
        groups = raw.get("group_lambdas", DEFAULT_SPACE["group_lambdas"]) or {}
        if not isinstance(groups, Mapping) or not all(isinstance(p, str) and p for p in groups.values()):
            raise RecipeError(f"space.group_lambdas must map group names to glob patterns, got {groups!r}")
        bad = [g for g in groups if not isinstance(g, str) or not GROUP_NAME.fullmatch(g)]
        if bad:
            raise RecipeError(f"space.group_lambdas: group name(s) {bad} must be letters, digits, '_' or '-'")
        if groups and lam is None:
            raise RecipeError("space.group_lambdas needs space.lambda: the range each group's lambda is drawn from")
        return cls(
            methods=tuple(methods),
            weights=weights,
            lam=lam,
            density=_optional_range(raw, "density", above=0.0, maximum=1.0),
            base_weight=_optional_range(raw, "base_weight", minimum=0.0),
            group_lambdas=dict(groups),
        )


@dataclass(frozen=True)
class Expert:
    """One expert: its checkpoint and the name its weight goes by (``weight.<name>``)."""

    name: str
    model: str


def _default_names(paths: Sequence[str]) -> list[str]:
    """The shortest trailing path parts (extension and ``CKPT+`` dropped) telling the
    experts apart: ``outputs/experts/noisy/expert.nemo`` -> ``noisy/expert`` beside
    another ``expert.nemo``.

    >>> _default_names(["a/noisy/expert.nemo", "a/accented/expert.nemo"])
    ['noisy/expert', 'accented/expert']
    >>> _default_names(["x/CKPT+noisy", "x/CKPT+phone"])
    ['noisy', 'phone']
    """
    parts = [list(Path(p).parts[:-1]) + [Path(p).stem.removeprefix("CKPT+")] for p in paths]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(i) for i in range(len(paths))]


def _experts(raw: Any) -> tuple[Expert, ...]:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise RecipeError("recipe key 'models' must list the experts: {model: PATH, name: NAME} entries or paths")
    entries = []
    for i, item in enumerate(raw):
        item = {"model": item} if isinstance(item, str) else item
        if not isinstance(item, Mapping) or not item.get("model"):
            raise RecipeError(f"models[{i}] must be a path or a mapping with a 'model' key, got {item!r}")
        if "weight" in item:
            raise RecipeError(f"models[{i}].weight: a search draws the weights; give their range as space.weights")
        extra = sorted(set(item) - {"model", "name"})
        if extra:
            raise RecipeError(f"models[{i}] has unknown key(s) {extra}; allowed: model, name")
        entries.append(item)
    paths = [pathname(f"models[{i}].model", e["model"]) for i, e in enumerate(entries)]
    if len(set(paths)) != len(paths):
        raise RecipeError("models: an expert is listed twice")
    defaults = _default_names(paths)
    names = [str(e.get("name") or d) for e, d in zip(entries, defaults)]
    if len(set(names)) != len(names):
        raise RecipeError(f"models: expert names must be unique, got {names}")
    return tuple(Expert(n, p) for n, p in zip(names, paths))


@dataclass(frozen=True)
class SearchDev:
    """The ``dev`` section: the target domains' dev sets, the original domain's, and
    what every set shares (subset, batch size, device, normalisation, toolkit keys)."""

    targets: Mapping[str, DevSet]
    original: Mapping[str, DevSet]
    log: Path

    def all(self) -> dict[str, DevSet]:
        return {**self.targets, **self.original}

    def to_dict(self) -> dict[str, Any]:
        shared = next(iter(self.targets.values())).to_dict()
        for key in ("manifest", "log"):
            shared.pop(key)
        return {
            "sets": {n: str(d.manifest) for n, d in self.targets.items()},
            "original": {n: str(d.manifest) for n, d in self.original.items()},
            "log": str(self.log),
            **shared,
        }

    @classmethod
    def from_mapping(cls, raw: Any, output: str) -> "SearchDev":
        if not isinstance(raw, Mapping):
            raise RecipeError("recipe key 'dev' must be a mapping with 'sets' (target domains) and 'original'")
        raw = dict(raw)
        sets = {}
        for key, what in (("sets", "the target domains' dev sets"), ("original", "the original domain's dev sets")):
            value = raw.pop(key, None)
            if not isinstance(value, Mapping) or not value or not all(isinstance(p, str) and p for p in value.values()):
                raise RecipeError(f"dev.{key} must map set names to manifests ({what}), got {value!r}")
            sets[key] = {str(n): p for n, p in value.items()}
        both = sorted(set(sets["sets"]) & set(sets["original"]))
        if both:
            raise RecipeError(f"dev: set name(s) {both} are both target sets and original sets")
        log = Path(raw.pop("log", None) or f"{output}.trials.json")
        if "manifest" in raw:
            raise RecipeError("dev.manifest is greedy_soup's; a search names its sets in dev.sets and dev.original")
        parsed = {key: {n: DevSet.from_mapping({**raw, "manifest": p, "log": str(log)}, output) for n, p in value.items()}
                  for key, value in sets.items()}
        return cls(parsed["sets"], parsed["original"], log)


@dataclass(frozen=True)
class Objective:
    """The weighted mean of the target sets' dev WERs (equal weights: the mean)."""

    weights: Mapping[str, float]

    def __call__(self, wers: Mapping[str, float]) -> float:
        total = sum(self.weights.values())
        return sum(w * wers[name] for name, w in self.weights.items()) / total

    @classmethod
    def from_mapping(cls, raw: Any, targets: Sequence[str]) -> "Objective":
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise RecipeError(f"recipe key 'objective' must be a mapping such as {{weights: {{domain: 2.0}}}}, got {raw!r}")
        known_keys(raw, {"weights"}, "objective")
        given = raw.get("weights") or {}
        if not isinstance(given, Mapping):
            raise RecipeError(f"objective.weights must map target set names to weights, got {given!r}")
        unknown = sorted(set(given) - set(targets))
        if unknown:
            raise RecipeError(f"objective.weights: {unknown} are not target sets (dev.sets: {list(targets)})")
        weights = {}
        for name in targets:
            value = given.get(name, 1.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise RecipeError(f"objective.weights.{name} must be a number >= 0, got {value!r}")
            weights[name] = float(value)
        if sum(weights.values()) <= 0:
            raise RecipeError("objective.weights are all 0: give at least one target set a positive weight")
        return cls(weights)


@dataclass(frozen=True)
class StudySettings:
    """Where the Optuna study lives: a storage URL (a path means SQLite) and its name."""

    storage: str
    name: str

    @property
    def where(self) -> str:
        """The storage as people read it: the SQLite file, or the URL."""
        return self.storage.removeprefix("sqlite:///")

    @classmethod
    def from_mapping(cls, raw: Any, output: str) -> "StudySettings":
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise RecipeError(f"recipe key 'study' must be a mapping {{storage, name}}, got {raw!r}")
        known_keys(raw, {"storage", "name"}, "study")
        storage = pathname("study.storage", raw["storage"]) if raw.get("storage") else f"{output}.study.db"
        if "://" not in storage:
            storage = f"sqlite:///{Path(storage).resolve()}"
        name = str(raw.get("name") or Path(output).name)
        return cls(storage, name)


@dataclass(frozen=True)
class Baseline:
    """A fixed recipe enqueued before the drawn trials: its method and the values it
    fixes (None: the method's default; every weight 1; the original left out)."""

    name: str
    method: str
    lam: float | None = None
    density: float | None = None
    base_weight: float | None = None
    weights: float | Mapping[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        values = {"lambda": self.lam, "density": self.density, "base_weight": self.base_weight, "weights": self.weights}
        return {"method": self.method, **{k: v for k, v in values.items() if v is not None}}

    def params(self, space: SearchSpace, experts: Sequence[Expert], ungrouped: bool) -> dict[str, Any]:
        """The Optuna parameters that draw this recipe; errors say which value the space cannot draw."""
        method = get_method(self.method)
        if self.method not in space.methods:
            raise RecipeError(f"baselines.{self.name}: method {self.method!r} is not in space.methods {list(space.methods)}")
        params: dict[str, Any] = {"method": self.method}
        weights = self.weights if isinstance(self.weights, Mapping) else {e.name: self.weights for e in experts}
        unknown = sorted(set(weights) - {e.name for e in experts})
        if unknown:
            raise RecipeError(f"baselines.{self.name}.weights: {unknown} are not expert names")
        drawn = {
            "weights": {f"weight.{e.name}": 1.0 if weights.get(e.name) is None else weights[e.name] for e in experts},
            "lambda": lambda_params(space, method.defaults.get("lambda") if self.lam is None else self.lam, ungrouped),
            "density": {"density": method.defaults.get("density") if self.density is None else self.density},
            "base_weight": {"base_weight": 0.0 if self.base_weight is None else self.base_weight},
        }
        given = {"weights": self.weights, "lambda": self.lam, "density": self.density, "base_weight": self.base_weight}
        ranges = {"weights": space.weights, "lambda": space.lam, "density": space.density, "base_weight": space.base_weight}
        for what, values in drawn.items():
            if not space.searches(method, what):
                if given[what] is not None:
                    raise RecipeError(f"baselines.{self.name}.{what}: trials of {self.method!r} do not draw {what} "
                                      f"(space.{what} is null, or the method has no {what})")
                continue
            for key, value in values.items():
                if value not in ranges[what]:
                    raise RecipeError(f"baselines.{self.name}: {key} = {value:g} lies outside space.{what} "
                                      f"{ranges[what].to_list()}")
            params.update(values)
        return params

    @classmethod
    def from_mapping(cls, name: str, raw: Any) -> "Baseline":
        if not isinstance(raw, Mapping) or not isinstance(raw.get("method"), str):
            raise RecipeError(f"baselines.{name} must be a mapping with a 'method', got {raw!r}")
        known_keys(raw, {"method", "lambda", "density", "base_weight", "weights"}, f"baselines.{name}")
        values: dict[str, Any] = {}
        for key in ("lambda", "density", "base_weight"):
            value = raw.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise RecipeError(f"baselines.{name}.{key} must be a finite number, got {value!r}")
            values[key] = None if value is None else float(value)
        weights = raw.get("weights")
        if weights is not None and not isinstance(weights, (int, float, Mapping)):
            raise RecipeError(f"baselines.{name}.weights must be a number or {{expert: weight}}, got {weights!r}")
        return cls(name, raw["method"], values["lambda"], values["density"], values["base_weight"], weights)


def lambda_params(space: SearchSpace, value: float | None, ungrouped: bool) -> dict[str, Any]:
    """``lambda`` (the tensors outside every group, if any) and ``lambda.<group>``, all ``value``."""
    params = {"lambda": value} if ungrouped else {}
    return {**params, **{f"lambda.{g}": value for g in space.group_lambdas}}


def _baselines(raw: Any) -> tuple[tuple[Baseline, ...], bool]:
    """The fixed recipes, and whether they are the defaults (which are left out, not
    refused, where the space cannot draw them)."""
    if raw is None:
        return tuple(Baseline.from_mapping(n, r) for n, r in DEFAULT_BASELINES.items()), True
    if not isinstance(raw, Mapping):
        raise RecipeError(f"recipe key 'baselines' must map names to fixed recipes {{method, lambda, ...}}, got {raw!r}")
    return tuple(Baseline.from_mapping(str(n), r) for n, r in raw.items()), False


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"recipe key {key!r} must be a finite number, got {value!r}")
    return float(value)


@recipe_kind(METHOD, defaults=DEFAULTS, about="the best merge under a forgetting budget: see merge_core.recipes.search")
@dataclass(frozen=True)
class SearchRecipe:
    """A validated ``method: search`` recipe.

    ``inputs`` is an ``average`` recipe of the generalist and the experts: the files,
    patterns and output checked as for any merge, and what the search opens once.
    """

    inputs: Recipe
    experts: tuple[Expert, ...]
    dev: SearchDev
    space: SearchSpace
    objective: Objective
    max_forgetting_pct: float
    trials: int
    sampler: str
    seed: int
    study: StudySettings
    if_infeasible: str
    baselines: tuple[Baseline, ...]
    default_baselines: bool
    plot: Path
    jobs: int = 1
    method: str = METHOD

    @property
    def output(self) -> str:
        return self.inputs.output

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as stored in provenance records and the trial log."""
        r = self.inputs
        return {
            "method": METHOD,
            "base_model": r.base_model,
            "models": [{"model": e.model, "name": e.name} for e in self.experts],
            "dev": self.dev.to_dict(),
            "max_forgetting_pct": self.max_forgetting_pct,
            "trials": self.trials,
            "space": self.space.to_dict(),
            "objective": {"weights": dict(self.objective.weights)},
            "sampler": self.sampler,
            "seed": self.seed,
            "study": {"storage": self.study.storage, "name": self.study.name},
            "if_infeasible": self.if_infeasible,
            "baselines": {b.name: b.to_dict() for b in self.baselines},
            "include": list(r.include),
            "exclude": list(r.exclude),
            "output": r.output,
            "plot": str(self.plot),
            "jobs": self.jobs,
            "allow_nonfinite": r.allow_nonfinite,
            "shard_size": r.shard_size,
            "hash_inputs": r.hash_inputs,
        }

    def fingerprint(self) -> dict[str, Any]:
        """What the study's trials were scored with: a resumed study must match it."""
        record = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE}
        record["dev"] = {k: v for k, v in record["dev"].items() if k not in ("log", "device")}
        return json.loads(json.dumps(record))

    def run(self, *, progress: bool = True) -> MergeResult:
        """:func:`merge_core.search.run_search`."""
        from merge_core.search import run_search

        return run_search(self, progress=progress)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | DictConfig) -> "SearchRecipe":
        if isinstance(raw, DictConfig):
            raw = OmegaConf.to_container(raw, resolve=True)
        raw = dict(raw)
        if raw.get("method") != METHOD:
            raise RecipeError(f"recipe key 'method' must be {METHOD!r} here, got {raw.get('method')!r}")
        known_keys(raw, SEARCH_KEYS)
        for key, why in (("base_model", "the generalist: theta_0 and the reference of forgetting"),
                         ("dev", "the dev sets every trial is scored on"), ("output", "where the chosen merge goes")):
            if raw.get(key) in (None, ""):
                raise RecipeError(f"recipe key {key!r} is required by {METHOD!r} ({why})")
        experts = _experts(raw.get("models"))
        output = str(raw["output"])
        inputs = Recipe.from_mapping({
            "method": "average", "base_model": str(raw["base_model"]), "models": [e.model for e in experts],
            "output": output, **{k: raw[k] for k in ("include", "exclude", "allow_nonfinite", "shard_size", "hash_inputs") if k in raw},
        })
        dev = SearchDev.from_mapping(raw["dev"], output)
        space = SearchSpace.from_mapping(raw.get("space"))
        budget = _number("max_forgetting_pct", raw.get("max_forgetting_pct", DEFAULTS["max_forgetting_pct"]))
        trials = integer("trials", raw.get("trials", DEFAULTS["trials"]))
        if trials < 1:
            raise RecipeError(f"recipe key 'trials' must be at least 1, got {trials}")
        jobs = integer("jobs", raw.get("jobs", 1))
        if jobs < 1:
            raise RecipeError(f"recipe key 'jobs' must be at least 1 (processes running trials), got {jobs}")
        baselines, default_baselines = _baselines(raw.get("baselines"))
        recipe = cls(
            inputs=inputs,
            experts=experts,
            dev=dev,
            space=space,
            objective=Objective.from_mapping(raw.get("objective"), list(dev.targets)),
            max_forgetting_pct=budget,
            trials=trials,
            sampler=choice(*SAMPLERS)("sampler", raw.get("sampler", DEFAULTS["sampler"])),
            seed=integer("seed", raw.get("seed", DEFAULTS["seed"])),
            study=StudySettings.from_mapping(raw.get("study"), output),
            if_infeasible=choice(*IF_INFEASIBLE)("if_infeasible", raw.get("if_infeasible", "refuse")),
            baselines=baselines,
            default_baselines=default_baselines,
            plot=Path(pathname("plot", raw["plot"]) if raw.get("plot") else f"{output}.pareto.png"),
            jobs=jobs,
        )
        recipe.check_space()
        return recipe

    def check_space(self) -> None:
        """Every method of the space with a merge of the experts (model counts, parameters,
        the output not an input), and every named baseline, before anything is opened."""
        for method in self.space.methods:
            try:
                trial_recipe(self, probe_params(self, method, ungrouped=True))
            except RecipeError as e:
                raise RecipeError(f"space.methods: {method}: {e}") from None
        for baseline in self.baselines:
            try:
                baseline.params(self.space, self.experts, ungrouped=True)
            except RecipeError:
                if not self.default_baselines:
                    raise


def probe_params(search: SearchRecipe, method: str, ungrouped: bool) -> dict[str, Any]:
    """A trial's parameters for ``method`` with every drawn value at its range's high end."""
    m = get_method(method)
    space = search.space
    params: dict[str, Any] = {"method": method}
    if space.searches(m, "weights"):
        params.update({f"weight.{e.name}": space.weights.high for e in search.experts})
    if space.searches(m, "lambda"):
        params.update(lambda_params(space, space.lam.high, ungrouped))
    if space.searches(m, "density"):
        params["density"] = space.density.high
    if space.searches(m, "base_weight"):
        params["base_weight"] = space.base_weight.high
    return params


def trial_recipe(search: SearchRecipe, params: Mapping[str, Any]) -> Recipe:
    """The per-tensor recipe a trial's parameters stand for (validated as any recipe)."""
    r = search.inputs
    overrides = [{"pattern": pattern, "parameters": {"lambda": params[f"lambda.{group}"]}}
                 for group, pattern in search.space.group_lambdas.items() if f"lambda.{group}" in params]
    raw: dict[str, Any] = {
        "method": params["method"],
        "base_model": r.base_model,
        "models": [{"model": e.model, "weight": params.get(f"weight.{e.name}", 1.0)} for e in search.experts],
        "parameters": {k: params[k] for k in SEARCHED if k in params},
        "overrides": overrides,
        "include": list(r.include),
        "exclude": list(r.exclude),
        "output": r.output,
        # checked once for the whole search (merge_core.search.unchanged_tensors), not once per trial
        "allow_nonfinite": True,
        "shard_size": r.shard_size,
        "hash_inputs": r.hash_inputs,
    }
    if "base_weight" in params:
        raw.update(include_base=True, base_weight=params["base_weight"])
    return Recipe.from_mapping(raw)
