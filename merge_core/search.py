"""Forgetting-budget search: the Optuna study behind ``method: search`` (:mod:`merge_core.recipes.search`).

Optuna (Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization Framework",
KDD 2019) draws each trial's merge (:func:`suggest`): a method of the recipe's space and
the values it takes. The trial is merged in memory by the engine's per-tensor path
(:func:`merge_core.engine.iter_merged`) from the experts opened once, loaded into the one
model the toolkit's dev evaluator restored, and decoded on every dev set
(:class:`DevScorer`). Its forgetting, the relative increase of the pooled original-domain
dev WER over the generalist's (:func:`merge_core.evaluation.report.forgetting_pct`), is
Optuna's constraint (``trial.set_constraint``, feasible at <= 0) for TPE (one objective:
the mean target dev WER) and NSGA-II (two: that and forgetting). The study is stored
(SQLite by default), so a rerun resumes it and Optuna's own tools read it; the chosen
trial, the lowest objective within the budget, is written by the engine
(:func:`merge_core.engine.write_stream`).

Optuna is imported when a search runs: the library imports without it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from merge_core.atomic import write_text_atomically
from merge_core.checkpoint import CheckpointReader
from merge_core.engine import (
    MERGE,
    Inputs,
    MergeResult,
    check_finite,
    input_roles,
    iter_merged,
    open_inputs,
    plan_actions,
    tensor_record,
    write_stream,
)
from merge_core.errors import EvaluationError, RecipeError, SearchError
from merge_core.evaluation.pareto import SearchPoint, plot_search
from merge_core.evaluation.report import forgetting_pct, pooled_stats
from merge_core.evaluation.wer import WerStats
from merge_core.recipes.greedy_soup import DevEvaluator, dev_evaluator
from merge_core.recipes.merge import Recipe
from merge_core.recipes.search import METHOD, SearchDev, SearchRecipe, lambda_params, trial_recipe
from merge_core.registry import get_method
from merge_core.selection import StateDict

if TYPE_CHECKING:
    import optuna

INSTALL = "pip install 'asr-merge[search]'"
CONSTRAINT = "forgetting"  # the name of the trials' Optuna constraint: forgetting % - budget
SCORES = "scores"  # the user attribute holding a trial's dev counts, objective and forgetting
METHOD_ATTR = "method"  # the user attribute naming a trial's merge method
BASELINE = "baseline"  # the user attribute naming the fixed recipe a trial is
POLL_S = 1.0  # how often the parent of parallel trial processes reads the study
UNCHANGED = "unchanged"  # the action of a selected tensor that no expert changed: copied, not merged


def import_optuna() -> Any:
    """Optuna, imported when a search runs (the library imports without it)."""
    try:
        import optuna
    except ImportError as e:
        raise SearchError(f"method: {METHOD} needs Optuna, which cannot be imported ({e}): {INSTALL}") from None
    return optuna


# ---------------------------------------------------------------------------
# scoring a trial


class DevScorer:
    """Every dev set of a search decoded by one restored model: per-set edit counts."""

    def __init__(self, template: CheckpointReader, dev: SearchDev) -> None:
        self.evaluators: dict[str, DevEvaluator] = {}
        first: DevEvaluator | None = None
        for name, dev_set in dev.all().items():
            self.evaluators[name] = dev_evaluator(template, dev_set, first, purpose=METHOD)
            first = first or self.evaluators[name]

    def __call__(self, state: StateDict) -> dict[str, WerStats]:
        return {name: evaluator.stats(state) for name, evaluator in self.evaluators.items()}


@dataclass(frozen=True)
class Scores:
    """What a trial (or the generalist) scored: counts per dev set, and the two numbers
    the search trades off, in %."""

    stats: Mapping[str, WerStats]
    objective: float  # weighted mean target dev WER
    original_wer: float  # pooled over the original sets
    forgetting_pct: float  # relative to the generalist's original_wer

    def to_dict(self) -> dict[str, Any]:
        return {"dev": {n: {**s.as_dict(), "wer": 100 * s.wer} for n, s in self.stats.items()},
                "objective": self.objective, "original_wer": self.original_wer, "forgetting_pct": self.forgetting_pct}


def scores_of(search: SearchRecipe, stats: Mapping[str, WerStats], reference_original: float | None) -> Scores:
    """The objective and forgetting of one trial's counts (``reference_original``: the
    generalist's pooled original WER in %; None when scoring the generalist itself)."""
    empty = [name for name, s in stats.items() if s.words == 0]
    if empty:
        raise EvaluationError(f"dev set(s) {empty} have no reference words after normalisation: no WER")
    original = 100 * pooled_stats(stats, list(search.dev.original)).wer
    objective = search.objective({n: 100 * stats[n].wer for n in search.dev.targets})
    forgetting = 0.0 if reference_original is None else forgetting_pct(original, reference_original)
    return Scores(dict(stats), objective, original, forgetting)


def merged_state(recipe: Recipe, inputs: Inputs, actions: dict[str, str]) -> StateDict:
    """Every tensor of the template's model for one trial, merged in memory (the
    engine's per-tensor path, nothing written)."""
    return dict(iter_merged(recipe, inputs, list(actions), actions=actions, progress=False))


def unchanged_tensors(search: SearchRecipe, inputs: Inputs, actions: Mapping[str, str]) -> list[str]:
    """The selected tensors that every expert left as the generalist's (a feature
    extractor's filterbank, a frozen layer), in one read of every input; NaN/Inf in any
    selected tensor is refused here, once for the whole search.

    Every method gives such a tensor back unchanged, but an average of equal values may
    differ from them in the last bit: copied, they stay exactly the generalist's, are not
    merged again in every trial, and keep the features a NeMo evaluator computed once valid.
    """
    unchanged = []
    for name, action in actions.items():
        if action != MERGE:
            continue
        tensors = [(reader, reader.get(name)) for reader in inputs.all()]
        if not search.inputs.allow_nonfinite:
            for reader, tensor in tensors:
                check_finite(tensor, reader, name)
        template = inputs.template.get(name)
        if all(torch.equal(tensor, template) for _, tensor in tensors):
            unchanged.append(name)
    return unchanged


def check_groups(search: SearchRecipe, actions: Mapping[str, str]) -> bool:
    """Refuse a group pattern that selects no merged tensor; True when some merged tensor
    is in no group (so the plain ``lambda`` is drawn for it)."""
    merged = [n for n, a in actions.items() if a == MERGE]
    for group, pattern in search.space.group_lambdas.items():
        if not any(fnmatch.fnmatchcase(n, pattern) for n in merged):
            raise RecipeError(f"space.group_lambdas.{group}: pattern {pattern!r} matches no merged tensor of "
                              f"{search.inputs.base_model}")
    patterns = list(search.space.group_lambdas.values())
    return any(not any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in merged)


# ---------------------------------------------------------------------------
# the study


def trial_method(trial: Any, search: SearchRecipe) -> str:
    """A trial's method: a fixed recipe's own, else the space's methods in turn by trial
    number, so every method gets its share of the trials. (A drawn method would not: TPE
    soon keeps to the method whose trials were within the budget most often, the cautious
    average, and stops trying lambdas small enough for task arithmetic or TIES.)"""
    return trial.user_attrs.get(METHOD_ATTR) or search.space.methods[trial.number % len(search.space.methods)]


def optuna_name(method: str, key: str) -> str:
    """The Optuna parameter of ``key`` in ``method``'s trials: one per method, so TPE learns
    each method's lambda (or weights) from that method's trials alone."""
    return f"{method}.{key}"


def suggest(trial: "optuna.Trial", search: SearchRecipe, ungrouped: bool) -> dict[str, Any]:
    """One trial's method and the values that method takes, drawn (define-by-run: a
    parameter exists only in the trials of the method that uses it)."""
    space = search.space
    method = get_method(trial_method(trial, search))
    ranges: dict[str, Any] = {}
    if space.searches(method, "weights"):
        ranges |= {f"weight.{e.name}": space.weights for e in search.experts}
    if space.searches(method, "lambda"):
        ranges |= {key: space.lam for key in lambda_params(space, None, ungrouped)}
    if space.searches(method, "density"):
        ranges["density"] = space.density
    if space.searches(method, "base_weight"):
        ranges["base_weight"] = space.base_weight
    drawn = {key: trial.suggest_float(optuna_name(method.name, key), r.low, r.high) for key, r in ranges.items()}
    return {"method": method.name, **drawn}


def recipe_params(trial: Any, search: SearchRecipe) -> dict[str, Any]:
    """A finished trial's parameters as :func:`~merge_core.recipes.search.trial_recipe` takes them."""
    method = trial_method(trial, search)
    prefix = optuna_name(method, "")
    return {"method": method, **{k.removeprefix(prefix): v for k, v in trial.params.items()}}


def make_sampler(optuna: Any, search: SearchRecipe, seed: int) -> Any:
    """Seeded TPE (one objective, the forgetting constraint) or NSGA-II (two objectives:
    target WER and forgetting, the same constraint).

    TPE is multivariate, over each method's parameters as a group: forgetting grows with
    lambda times the experts' weights together, which independent draws cannot learn.
    NSGA-II's population is a few times smaller than the trials, so it gets past its
    first, random, generation.
    """
    if search.sampler == "tpe":
        with warnings.catch_warnings():  # `group` is marked experimental since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, search.trials // 3)))


def storage(optuna: Any, search: SearchRecipe) -> Any:
    """The study's storage: an SQLite file (its folder made) or any URL Optuna takes."""
    if not search.study.storage.startswith("sqlite:///"):
        return search.study.storage
    Path(search.study.where).parent.mkdir(parents=True, exist_ok=True)
    # parallel trial processes share the file: wait for its lock rather than fail after SQLite's 5 s
    return optuna.storages.RDBStorage(search.study.storage, engine_kwargs={"connect_args": {"timeout": 120}})


def open_study(optuna: Any, search: SearchRecipe, seed: int | None = None) -> Any:
    """The study in its storage, created or loaded; a stored study made by a different
    recipe (other experts, dev sets, space, budget...) is refused, naming what differs."""
    directions = ["minimize"] if search.sampler == "tpe" else ["minimize", "minimize"]
    sampler = make_sampler(optuna, search, search.seed if seed is None else seed)
    study = optuna.create_study(storage=storage(optuna, search), study_name=search.study.name, sampler=sampler,
                                directions=directions, load_if_exists=True)
    fingerprint = search.fingerprint()
    stored = study.user_attrs.get("recipe")
    if stored is None:
        if study.trials:
            raise SearchError(f"study {search.study.name!r} in {search.study.where} holds trials that no asr-merge "
                              "search made; give study.name another name")
        study.set_user_attr("recipe", fingerprint)
    elif stored != fingerprint:
        differ = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        raise SearchError(f"study {search.study.name!r} in {search.study.where} was run with another recipe "
                          f"(it differs in {differ}); resume it with the same recipe, or give study.name another name")
    return study


def finished(optuna: Any, study: Any) -> list[Any]:
    """The trials that ran to the end (scored, or pruned as undrawable)."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=done)


def enqueue_baselines(search: SearchRecipe, study: Any, ungrouped: bool) -> list[str]:
    """The fixed recipes, first in the queue of a new study; returns the names of default
    ones the space cannot draw (left out)."""
    left_out = []
    for baseline in search.baselines:
        try:
            params = baseline.params(search.space, search.experts, ungrouped)
            method = params.pop("method")
        except RecipeError:
            if not search.default_baselines:
                raise
            left_out.append(baseline.name)
            continue
        study.enqueue_trial({optuna_name(method, k): v for k, v in params.items()},
                            user_attrs={BASELINE: baseline.name, METHOD_ATTR: method})
    return left_out


@dataclass
class TrialRunner:
    """Optuna's objective: draw, merge in memory, decode every dev set, record."""

    search: SearchRecipe
    inputs: Inputs
    actions: dict[str, str]
    scorer: Callable[[StateDict], dict[str, WerStats]]
    reference: Scores
    ungrouped: bool

    def __call__(self, trial: "optuna.Trial") -> float | tuple[float, float]:
        import optuna

        start = time.perf_counter()
        params = suggest(trial, self.search, self.ungrouped)
        trial.set_user_attr(METHOD_ATTR, params["method"])
        try:
            recipe = trial_recipe(self.search, params)
        except RecipeError as e:  # e.g. every weight drawn as 0: no merge to score
            trial.set_user_attr("pruned", str(e))
            raise optuna.TrialPruned(str(e)) from None
        stats = self.scorer(merged_state(recipe, self.inputs, self.actions))
        scores = scores_of(self.search, stats, self.reference.original_wer)
        # one attribute, not one per number: each is a write (a commit) to the storage
        trial.set_user_attr(SCORES, {**scores.to_dict(), "seconds": time.perf_counter() - start})
        # Optuna's constraint: a value <= 0 is feasible
        trial.set_constraint(CONSTRAINT, scores.forgetting_pct - self.search.max_forgetting_pct)
        if self.search.sampler == "tpe":
            return scores.objective
        return scores.objective, scores.forgetting_pct


# ---------------------------------------------------------------------------
# choosing, logging, plotting


def scores(trial: Any) -> dict[str, Any]:
    """What a finished trial scored (:meth:`Scores.to_dict` and its seconds)."""
    return trial.user_attrs[SCORES]


def scored(trials: Sequence[Any]) -> list[Any]:
    """The trials that were merged, decoded and recorded (not pruned, failed or running)."""
    return [t for t in trials if t.state.name == "COMPLETE" and SCORES in t.user_attrs]


def is_feasible(trial: Any, search: SearchRecipe) -> bool:
    return scores(trial)["forgetting_pct"] <= search.max_forgetting_pct


def choose(trials: Sequence[Any], search: SearchRecipe) -> Any | None:
    """The scored trial of lowest objective within the budget (ties: less forgetting,
    then the earlier trial); None when no trial is within it."""
    feasible = [t for t in scored(trials) if is_feasible(t, search)]
    return min(feasible, key=lambda t: (scores(t)["objective"], scores(t)["forgetting_pct"], t.number), default=None)


def least_forgetting(trials: Sequence[Any]) -> Any | None:
    """The scored trial that forgot least (ties: lower objective, then the earlier trial)."""
    return min(scored(trials), key=lambda t: (scores(t)["forgetting_pct"], scores(t)["objective"], t.number), default=None)


def trial_record(trial: Any, search: SearchRecipe) -> dict[str, Any]:
    """One trial as the log holds it."""
    attrs = trial.user_attrs
    record = {"number": trial.number, "state": trial.state.name, "baseline": attrs.get(BASELINE),
              "params": recipe_params(trial, search)}
    if SCORES in attrs:
        record |= {**attrs[SCORES], "feasible": is_feasible(trial, search)}
    if "pruned" in attrs:
        record["pruned"] = attrs["pruned"]
    return record


class SearchLog:
    """The trial log (JSON, rewritten atomically after every trial, so an interrupted
    search leaves a readable one) and a tqdm bar over trials with the best so far."""

    def __init__(self, search: SearchRecipe, reference: Scores, total: int, progress: bool) -> None:
        self.search, self.reference = search, reference
        self.bar = tqdm(total=total, desc=METHOD, unit="trial", disable=not progress)

    def update(self, trials: Sequence[Any], done: int) -> None:
        """Move the bar to ``done`` trials of this run and rewrite the log from ``trials``."""
        self.bar.update(done - self.bar.n)
        best = choose(trials, self.search)
        if best is not None:
            self.bar.set_postfix(best=f"{scores(best)['objective']:.2f}%",
                                 forgetting=f"{scores(best)['forgetting_pct']:+.2f}%", trial=best.number)
        else:
            self.bar.set_postfix(best="none within budget")
        self.write(trials)

    def write(self, trials: Sequence[Any], **extra: Any) -> None:
        record = {
            "recipe": self.search.to_dict(),
            "study": {"name": self.search.study.name, "storage": self.search.study.storage},
            "max_forgetting_pct": self.search.max_forgetting_pct,
            "reference": self.reference.to_dict(),
            "trials": [trial_record(t, self.search) for t in sorted(trials, key=lambda t: t.number)],
            **extra,
        }
        write_text_atomically(self.search.dev.log, json.dumps(record, indent=2) + "\n")

    def close(self) -> None:
        self.bar.close()


def plot(search: SearchRecipe, trials: Sequence[Any], reference: Scores, chosen: int | None) -> Path:
    """``<output>.pareto.png``: every scored trial, the fixed recipes, the budget, the choice."""
    points = [SearchPoint(t.number, scores(t)["forgetting_pct"], scores(t)["objective"], is_feasible(t, search),
                          t.user_attrs.get(BASELINE)) for t in scored(trials)]
    return plot_search(points, budget=search.max_forgetting_pct, chosen=chosen, reference_objective=reference.objective,
                       title=f"study {search.study.name}: {len(points)} trials, budget {search.max_forgetting_pct:g}% "
                             "forgetting", dest=search.plot)


def render_choice(search: SearchRecipe, trials: Sequence[Any], reference: Scores, chosen: Any | None) -> str:
    """The generalist, the fixed recipes and the chosen trial as a small text table."""
    rows = [f"{'':<24}  {'trial':>5}  {'target dev WER %':>16}  {'forgetting %':>12}"]
    rows.append(f"{'generalist':<24}  {'-':>5}  {reference.objective:>16.2f}  {0.0:>+12.2f}")
    shown = [t for t in scored(trials) if t.user_attrs.get(BASELINE)]
    if chosen is not None:
        shown.append(chosen)
    for t in shown:
        label = t.user_attrs.get(BASELINE) if t is not chosen else f"chosen ({trial_method(t, search)})"
        rows.append(f"{label:<24}  {t.number:>5}  {scores(t)['objective']:>16.2f}  {scores(t)['forgetting_pct']:>+12.2f}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------
# running a recipe


def quiet_optuna(optuna: Any) -> None:
    """Optuna's per-trial INFO lines off: the bar and the log report every trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextlib.contextmanager
def opened(search: SearchRecipe) -> Iterator[tuple[Inputs, dict[str, str], bool]]:
    """The generalist and the experts opened once (memory maps), what is merged (tensors
    no expert changed are copied: :func:`unchanged_tensors`), whether some merged tensor
    is in no lambda group; inputs checked as the engine checks them."""
    with open_inputs(search.inputs) as inputs:
        actions = plan_actions(search.inputs, inputs.template)
        for name in unchanged_tensors(search, inputs, actions):
            actions[name] = UNCHANGED
        ungrouped = check_groups(search, actions)
        yield inputs, actions, ungrouped


def template_state(inputs: Inputs, actions: Mapping[str, str]) -> StateDict:
    """The generalist's own tensors, as a trial's state dict."""
    return {name: inputs.template.get(name) for name in actions}


def measure_reference(search: SearchRecipe, scorer: DevScorer, inputs: Inputs, actions: Mapping[str, str]) -> Scores:
    """The generalist's dev WERs: the reference of forgetting, measured once per run."""
    reference = scores_of(search, scorer(template_state(inputs, actions)), None)
    if reference.original_wer == 0:
        raise EvaluationError(
            f"the generalist's pooled WER on the original dev sets {list(search.dev.original)} is 0: forgetting "
            "relative to it is undefined; give dev.original more (or harder) utterances"
        )
    return reference


def search_worker(search: SearchRecipe, n_trials: int, reference: Scores, seed: int, threads: int) -> int:
    """One process of a parallel search: its own inputs and restored model, ``n_trials``
    trials on the shared study (its sampler seeded apart, so the processes draw apart)."""
    torch.set_num_threads(threads)
    optuna = import_optuna()
    quiet_optuna(optuna)
    study = open_study(optuna, search, seed)
    with opened(search) as (inputs, actions, ungrouped):
        runner = TrialRunner(search, inputs, actions, DevScorer(inputs.template, search.dev), reference, ungrouped)
        study.optimize(runner, n_trials=n_trials)
    return n_trials


def run_in_processes(optuna: Any, search: SearchRecipe, study: Any, reference: Scores, count: int, log: SearchLog,
                     done: int) -> None:
    """``count`` trials shared by ``jobs`` spawned processes; this one follows the study
    in its storage, moving the bar (``done`` trials of this run so far) and rewriting the log."""
    shares = [count // search.jobs + (i < count % search.jobs) for i in range(search.jobs)]
    threads = max(1, (os.cpu_count() or 1) // search.jobs)
    before = len(finished(optuna, study))
    context = multiprocessing.get_context("spawn")  # a forked toolkit with live torch threads can deadlock
    with ProcessPoolExecutor(max_workers=search.jobs, mp_context=context) as pool:
        futures = [pool.submit(search_worker, search, n, reference, search.seed + 1 + i, threads)
                   for i, n in enumerate(shares) if n]
        while not all(f.done() for f in futures):
            time.sleep(POLL_S)
            log.update(study.get_trials(deepcopy=False), done + len(finished(optuna, study)) - before)
        for future in futures:
            future.result()  # a process's error, raised here


def run_trials(optuna: Any, search: SearchRecipe, study: Any, runner: TrialRunner, remaining: int,
               log: SearchLog) -> None:
    """The remaining trials, in this process or (``jobs`` > 1) in several. The enqueued
    fixed recipes always run here, first: two processes sharing an SQLite study can both
    claim one waiting trial (SQLite has no row locks), and the second could not record it."""
    waiting = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    here = remaining if search.jobs == 1 or remaining - waiting <= 1 else min(waiting, remaining)
    done = 0

    def on_trial(study: Any, trial: Any) -> None:
        nonlocal done
        done += 1
        log.update(study.get_trials(deepcopy=False), done)

    study.optimize(runner, n_trials=here, callbacks=[on_trial])
    if remaining > here:
        run_in_processes(optuna, search, study, runner.reference, remaining - here, log, done)


def infeasible_message(search: SearchRecipe, trials: Sequence[Any]) -> str:
    """Why nothing was written, with the least forgetting the search reached."""
    least = least_forgetting(trials)
    reached = "no trial was scored" if least is None else (
        f"the least forgetting reached was {scores(least)['forgetting_pct']:+.2f}% (trial {least.number}, "
        f"mean target dev WER {scores(least)['objective']:.2f}%)")
    return (
        f"{search.output}: no trial of study {search.study.name!r} ({search.study.where}) kept forgetting within "
        f"max_forgetting_pct {search.max_forgetting_pct:g}: {reached}; nothing was written. Raise the budget, run "
        f"more trials (trials=N resumes the study), or set if_infeasible: least_forgetting to write that trial"
    )


def write_choice(search: SearchRecipe, inputs: Inputs, actions: dict[str, str], chosen: Any, reference: Scores,
                 within_budget: bool) -> tuple[list[Path], dict[str, Any], dict[str, Any]]:
    """The chosen trial's merge written by the engine, with the study, the trial and its
    dev numbers in the provenance; returns the files, the provenance and the tensor record."""
    params = recipe_params(chosen, search)
    recipe = replace(trial_recipe(search, params), allow_nonfinite=search.inputs.allow_nonfinite)
    unchanged = sorted(n for n, a in actions.items() if a == UNCHANGED)
    tensors = {**tensor_record(inputs, actions), "copied_unchanged": unchanged,
               "note": "integer and bool tensors are never averaged, and tensors no expert changed are not merged: "
                       "they are copied unchanged"}
    attrs = scores(chosen)
    provenance = {
        **search.to_dict(),
        "parameters": params,
        "search": {
            "study": search.study.name,
            "storage": search.study.storage,
            "trial": chosen.number,
            "baseline": chosen.user_attrs.get(BASELINE),
            "params": params,
            "merge": recipe.to_dict(),
            "dev_wer": {name: counts["wer"] for name, counts in attrs["dev"].items()},
            "dev": attrs["dev"],
            "objective": attrs["objective"],
            "original_wer": attrs["original_wer"],
            "forgetting_pct": attrs["forgetting_pct"],
            "max_forgetting_pct": search.max_forgetting_pct,
            "within_budget": within_budget,
            "reference": reference.to_dict(),
        },
    }
    files, record = write_stream(
        Path(search.output),
        provenance,
        input_roles(recipe, inputs),
        inputs.template,
        tensors,
        lambda order: iter_merged(recipe, inputs, order, actions=actions, progress=False),
        hash_inputs=recipe.hash_inputs,
        shard_size=recipe.shard_size,
    )
    return files, record, tensors


def run_search(search: SearchRecipe, *, progress: bool = True) -> MergeResult:
    """Run a ``search`` recipe: open the experts once, restore the template's model once,
    measure the generalist, run the study's remaining trials (the fixed recipes first in a
    new study), log and plot every trial, and write the chosen merge, or refuse when no
    trial kept within the budget (``if_infeasible: refuse``: nothing is written but the
    log, the plot and the study)."""
    optuna = import_optuna()
    quiet_optuna(optuna)
    start = time.perf_counter()
    output = Path(search.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with opened(search) as (inputs, actions, ungrouped):
        study = open_study(optuna, search)
        scorer = DevScorer(inputs.template, search.dev)
        reference = measure_reference(search, scorer, inputs, actions)
        left_out = enqueue_baselines(search, study, ungrouped) if not study.trials else []
        if left_out:
            print(f"{METHOD}: fixed recipe(s) {left_out} left out: the space cannot draw them")
        remaining = max(0, search.trials - len(finished(optuna, study)))
        log = SearchLog(search, reference, remaining, progress)
        try:
            run_trials(optuna, search, study, TrialRunner(search, inputs, actions, scorer, reference, ungrouped),
                       remaining, log)
        finally:
            log.close()
        trials = study.get_trials(deepcopy=False)
        chosen = choose(trials, search)
        within_budget = chosen is not None
        if chosen is None and search.if_infeasible == "least_forgetting":
            chosen = least_forgetting(trials)
        plot(search, trials, reference, None if chosen is None else chosen.number)
        outcome = "within budget" if within_budget else "least forgetting (over budget)" if chosen else "refused"
        log.write(trials, chosen=None if chosen is None else chosen.number, outcome=outcome)
        print(render_choice(search, trials, reference, chosen))
        if chosen is None:
            raise SearchError(infeasible_message(search, trials))
        files, record, tensors = write_choice(search, inputs, actions, chosen, reference, within_budget)
    attrs = scores(chosen)
    summary = (
        f"trial {chosen.number} of {len(trials)} ({trial_method(chosen, search)}): mean target dev WER "
        f"{attrs['objective']:.2f}%, forgetting {attrs['forgetting_pct']:+.2f}% "
        f"({'within' if within_budget else 'OVER'} the {search.max_forgetting_pct:g}% budget); "
        f"trials in {search.dev.log}, plot {search.plot}"
    )
    return MergeResult.of_stream(output, (files, record), tensors, actions, start, summary)
