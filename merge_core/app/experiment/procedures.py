"""The papers' procedures, each a function from its parameters to the models it adds.

An experiment file's ``procedures`` is a list of one-key mappings, ``{name: parameters}``;
:func:`procedure` registers one by that name. A procedure returns :class:`Spec` s: named
models, each fine-tuned (an :class:`~merge_core.app.experiment.plan.ExpertJob`) or merged (a
recipe of the recipes' front door), that refer to the models they start from by name.
Names are resolved only once every procedure has declared its models, so the order of
the list does not matter; a name no procedure declares, or a cycle, is refused before
any job starts (:mod:`merge_core.app.experiment.graph`).

Single-domain experts are named ``FT <domain>``, sequential fine-tunes
``sequential <a>><b>><c>``, as the AoDE paper's Table VII rows.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from merge_core.app.experiment.plan import ExpertJob, slug
from merge_core.errors import RecipeError
from merge_core.recipes.greedy_soup import METHOD as SOUP_METHOD
from merge_core.recipes.mact import sample_hyperparameters
from merge_core.recipes.search import METHOD as SEARCH_METHOD

GENERALIST = "pretrained"  # the generalist's name: a report's reference row, a merge's base


@dataclass(frozen=True)
class Spec:
    """One model of an experiment.

    A fine-tune has ``job`` (its ``start``, if any, names the model it starts from); a
    merge has ``recipe``: given the paths of the models it names and the experiment's
    context, the recipe without ``output`` (built when the merge starts, so that it may
    list what its inputs wrote, MAST's snapshots).
    """

    name: str
    key: str  # where the experiment file declares it, for errors: "procedures[3].merge"
    needs: tuple[str, ...] = ()  # names of the models it starts from or merges
    job: ExpertJob | None = None
    recipe: Callable[[Mapping[str, str], "Context"], dict[str, Any]] | None = None
    shape: Any = None  # what names a merge's output besides its inputs' paths (when ``recipe`` lists files)
    row: bool = True  # a row of the report (sequential editing's inner steps are not)


@dataclass(frozen=True)
class Context:
    """What procedures see of the experiment: its target domains in order, seed, where it writes
    reports, and the toolkit's options of a dev set."""

    domains: tuple[str, ...]
    seed: int
    report_dir: str
    dev_manifest: Callable[[str], str]  # domain -> its dev manifest
    original_dev: Mapping[str, str]  # the original sets a search measures forgetting on
    dev_options: Mapping[str, Any] = field(default_factory=dict)


Procedure = Callable[[Mapping[str, Any], Context, str], list[Spec]]
PROCEDURES: dict[str, Procedure] = {}


def procedure(name: str) -> Callable[[Procedure], Procedure]:
    """Register a procedure under ``name``, the key an experiment file gives it."""

    def register(fn: Procedure) -> Procedure:
        PROCEDURES[name] = fn
        return fn

    return register


def expert_name(domain: str) -> str:
    return f"FT {domain}"


def sequential_name(order: Sequence[str]) -> str:
    return "sequential " + ">".join(order)


def _domains(params: Mapping[str, Any], ctx: Context, key: str) -> tuple[str, ...]:
    domains = params.get("domains", "all")
    domains = ctx.domains if domains == "all" else tuple(domains)
    unknown = [d for d in domains if d not in ctx.domains]
    if unknown:
        raise RecipeError(f"{key}.domains: {unknown} are not domains of this experiment (declared: {list(ctx.domains)})")
    return domains


def _models(params: Mapping[str, Any], ctx: Context) -> list[str]:
    """A merge's ``models``: names, or ``experts`` for every single-domain expert."""
    models = params.get("models", "experts")
    return [expert_name(d) for d in ctx.domains] if models == "experts" else [str(m) for m in models]


@procedure("experts")
def experts(params: Mapping[str, Any], ctx: Context, key: str) -> list[Spec]:
    """One expert per domain, fine-tuned from the generalist (or from the model ``start`` names):
    ``FT <domain>``; with ``lora: true`` ``LoRA <domain>`` (folded back on export); with
    ``llrd: false`` one learning rate for every layer, ``FT <domain> without LLRD``."""
    lora, llrd, start = bool(params.get("lora", False)), bool(params.get("llrd", True)), params.get("start")
    label = "LoRA {}" if lora else "FT {}" if llrd else "FT {} without LLRD"
    if start:
        label += f" @{start}"
    return [
        Spec(label.format(d), key, needs=(start,) if start else (), job=ExpertJob((d,), lora=lora, llrd=llrd, start=start),
             row=bool(params.get("report", True)))
        for d in _domains(params, ctx, key)
    ]


@procedure("sequential")
def sequential(params: Mapping[str, Any], ctx: Context, key: str) -> list[Spec]:
    """Sequential fine-tuning (the AoDE paper's Scenario 2): each order's domains one after
    another, each step from the previous one's model; ``orders`` defaults to the domains'
    order and its reverse. Only the whole order is a row."""
    orders = params.get("orders") or [list(ctx.domains), list(ctx.domains)[::-1]]
    specs: dict[str, Spec] = {}
    for i, order in enumerate(orders):
        _domains({"domains": order}, ctx, f"{key}.orders[{i}]")
        for k in range(2, len(order) + 1):
            # a chain's first step is the single-domain expert, which an `experts` entry declares
            first = expert_name(order[0]) if k == 2 else sequential_name(order[: k - 1])
            name = sequential_name(order[:k])
            specs[name] = Spec(name, key, needs=(first,), job=ExpertJob(tuple(order[:k])), row=k == len(order))
    return list(specs.values())


def static_recipe(recipe: Mapping[str, Any], models: Sequence[str], base: str = GENERALIST):
    """A merge recipe whose ``models`` (names, or ``{model: name, weight: w}``) become paths."""

    def build(paths: Mapping[str, str], ctx: Context) -> dict[str, Any]:
        listed = [{**m, "model": paths[m["model"]]} if isinstance(m, Mapping) else paths[m] for m in models]
        return {**recipe, "base_model": paths[base], "models": listed}

    return build


def _name(m: Any) -> str:
    return str(m["model"]) if isinstance(m, Mapping) else str(m)


@procedure("merge")
def merge(params: Mapping[str, Any], ctx: Context, key: str) -> list[Spec]:
    """Any merge recipe over named models (``models``, default ``experts``: every single-domain
    expert): its ``method``, ``parameters``, ``include_base``, ``base_weight``... as in a
    recipe file; ``upweight: {model: NAME, weight: W}`` weights one model W and the others 1."""
    if "name" not in params:
        raise RecipeError(f"{key}: a merge needs a name (its report row), e.g. name: AoDE")
    models: list[Any] = _models(params, ctx)
    up = params.get("upweight")
    if up:
        models = [{"model": m, "weight": float(up["weight"]) if m == up["model"] else 1.0} for m in models]
    base = str(params.get("base", GENERALIST))
    recipe = {k: v for k, v in params.items() if k not in ("name", "models", "upweight", "base", "report")}
    recipe.setdefault("method", "average")
    return [Spec(str(params["name"]), key, needs=(base, *map(_name, models)), recipe=static_recipe(recipe, models, base),
                 row=bool(params.get("report", True)))]


def round_name(variant: str, k: int) -> str:
    """Iterative AoDE's k-th round of ``variant`` (the name of its first round's merge).

    >>> round_name("AoDE", 1), round_name("AoDE with orig", 3)
    ('AoDE', 'AoDE with orig r3')
    """
    return variant if k == 1 else f"{variant} r{k}"


@procedure("iterative_aode")
def iterative_aode(params: Mapping[str, Any], ctx: Context, key: str) -> list[Spec]:
    """Iterative AoDE (the AoDE paper's Scenario 3): round k's experts, every domain fine-tuned
    again from round k-1's average, then averaged (with the generalist when ``include_base``).
    ``from`` names each variant's first round, a merge declared elsewhere (default ``AoDE``);
    ``rounds`` counts that first round. Each round's expert of domain d is ``FT d @<round>``."""
    rounds = int(params.get("rounds", 3))
    variants = params.get("from", ["AoDE"])
    include = params.get("include_base", [v != "AoDE" and "orig" in v for v in variants])
    specs: list[Spec] = []
    for variant, with_base in zip(variants, include):
        for k in range(2, rounds + 1):
            start = round_name(variant, k - 1)
            experts = [Spec(f"FT {d} @{start}", key, needs=(start,), job=ExpertJob((d,), start=start), row=False)
                       for d in ctx.domains]
            specs += experts
            names = [e.name for e in experts]
            specs.append(Spec(round_name(variant, k), key, needs=(GENERALIST, *names),
                              recipe=static_recipe({"method": "average", "include_base": bool(with_base)}, names)))
    return specs


def edit_name(label: str, k: int, steps: int) -> str:
    return f"sequential editing {label}" if k == steps else f"sequential editing {label} step {k}"


@procedure("sequential_editing")
def sequential_editing(params: Mapping[str, Any], ctx: Context, key: str) -> list[Spec]:
    """Sequential editing (Kulshreshtha et al., "Sequential Editing for Lifelong Training of
    Speech Recognition Models"), domain after domain in ``order``::

        theta_t = theta_{t-1} + lambda * trim(theta_hat_t - theta_{t-1})

    theta_hat_t fine-tuned on domain t from theta_{t-1} (theta_hat_1: the single-domain
    expert), merged by ``method`` (``task_arithmetic`` or ``ties``) with ``parameters``;
    ``label`` names the rows, ``sequential editing <label>``."""
    order = _domains({"domains": params.get("order", "all")}, ctx, f"{key}.order")
    label, method = str(params.get("label", params.get("method", "TA"))), params.get("method", "task_arithmetic")
    parameters = dict(params.get("parameters") or {"lambda": 0.4})
    specs: list[Spec] = []
    previous = GENERALIST
    for k, domain in enumerate(order, start=1):
        if k == 1:
            expert = expert_name(domain)
        else:
            expert = f"FT {domain} @{previous}"
            specs.append(Spec(expert, key, needs=(previous,), job=ExpertJob((domain,), start=previous), row=False))
        name = edit_name(label, k, len(order))
        recipe = static_recipe({"method": method, "parameters": parameters}, [expert], base=previous)
        specs.append(Spec(name, key, needs=(previous, expert), recipe=recipe, row=k == len(order)))
        previous = name
    return specs


@procedure("mast")
def mast(params: Mapping[str, Any], ctx: Context, key: str) -> list[Spec]:
    """MAST (Ducorroy and Riad, "Robust fine-tuning of speech recognition models via model
    merging"): the focus ``domain`` 's expert trajectory, its ``last`` per-epoch snapshots
    averaged: ``MAST <domain>``."""
    domain, last = _domains({"domains": [params["domain"]]}, ctx, key)[0], int(params.get("last", 4))
    expert = expert_name(domain)

    def build(paths: Mapping[str, str], ctx: Context) -> dict[str, Any]:
        snapshots = Path(ctx.report_dir).parent / "snapshots" / Path(paths[expert]).name
        chosen = sorted(snapshots.glob("*.safetensors"))[-last:]
        return {"method": "average", "base_model": paths[expert], "models": [str(p) for p in chosen]}

    return [Spec(f"MAST {domain}", key, needs=(expert,), recipe=build, shape={"mast": last})]


def mact_names(domain: str, runs: int, seed: int) -> list[tuple[str, ExpertJob]]:
    """MAcT's runs on ``domain``: hyper-parameters sampled from Ducorroy and Riad's ranges."""
    rng = random.Random(seed)
    jobs = [ExpertJob((domain,), hyper=sample_hyperparameters(rng)) for _ in range(runs)]
    return [(f"MAcT {domain} run {i + 1}", job) for i, job in enumerate(jobs)]


@procedure("mact")
def mact(params: Mapping[str, Any], ctx: Context, key: str) -> list[Spec]:
    """MAcT: ``runs`` fine-tunes of ``domain`` with sampled hyper-parameters, each keeping its
    best dev-WER model, averaged: ``MAcT <domain>``."""
    domain = _domains({"domains": [params["domain"]]}, ctx, key)[0]
    runs = mact_names(domain, int(params.get("runs", 4)), ctx.seed)
    specs = [Spec(name, key, job=job, row=False) for name, job in runs]
    names = [name for name, _ in runs]
    specs.append(Spec(f"MAcT {domain}", key, needs=(GENERALIST, *names),
                      recipe=static_recipe({"method": "average"}, names)))
    return specs


@procedure("smact")
def smact(params: Mapping[str, Any], ctx: Context, key: str) -> list[Spec]:
    """SMAcT (Ducorroy and Riad, Algorithm 1): the focus ``domain`` 's plain fine-tune, then its
    MAcT runs (``runs``, as the ``mact`` entry's), each kept only if the soup's WER on the
    domain's dev set drops: ``SMAcT <domain>``; the trials are logged beside the report."""
    domain = _domains({"domains": [params["domain"]]}, ctx, key)[0]
    candidates = [expert_name(domain)] + [n for n, _ in mact_names(domain, int(params.get("runs", 4)), ctx.seed)]
    name = f"SMAcT {domain}"

    def build(paths: Mapping[str, str], ctx: Context) -> dict[str, Any]:
        dev = {"manifest": ctx.dev_manifest(domain), "log": f"{ctx.report_dir}/{slug(name)}.trials.json"}
        return {"method": SOUP_METHOD, "base_model": paths[GENERALIST], "models": [paths[c] for c in candidates],
                "dev": {**dev, **ctx.dev_options}}

    return [Spec(name, key, needs=(GENERALIST, *candidates), recipe=build)]


def _baseline(baseline: Mapping[str, Any], models: Sequence[str], domains: Sequence[str]) -> dict[str, Any]:
    """A search baseline as the search recipe takes it; ``upweight: {model, weight}`` (as a
    merge's) becomes weights relative to that model's, which an average does not tell apart."""
    baseline = dict(baseline)
    up = baseline.pop("upweight", None)
    if up:
        baseline["weights"] = {d: 1.0 if m == up["model"] else 1.0 / float(up["weight"]) for m, d in zip(models, domains)}
    return baseline


SEARCH_ROW_FORMAT = "search (<= {budget:g}% forgetting)"


@procedure("search")
def search(params: Mapping[str, Any], ctx: Context, key: str) -> list[Spec]:
    """The forgetting-budget search (``asr-merge search``) over ``models`` (default: the
    single-domain experts): the lowest mean target-domain dev WER whose forgetting on the
    original dev sets stays within ``budget`` %, in ``trials`` trials; ``baselines`` (fixed
    recipes it has to beat, as the search recipe's) are enqueued first. Its trials, plot and
    study beside the report."""
    budget = float(params.get("budget", 1.0))
    name = str(params.get("name", SEARCH_ROW_FORMAT.format(budget=budget)))
    models = _models(params, ctx)
    domains = [m[len("FT "):] if m.startswith("FT ") else m for m in models]

    def build(paths: Mapping[str, str], ctx: Context) -> dict[str, Any]:
        # the study is named by the models it searches (their file names hash all that shapes them):
        # new models start a new study, a rerun resumes this one
        study = hashlib.sha256(json.dumps([paths[m].rsplit("/", 1)[-1] for m in models]).encode()).hexdigest()[:12]
        report = ctx.report_dir
        return {
            "method": SEARCH_METHOD,
            "base_model": paths[GENERALIST],
            "models": [{"model": paths[m], "name": d} for m, d in zip(models, domains)],
            "dev": {"sets": {d: ctx.dev_manifest(d) for d in domains}, "original": dict(ctx.original_dev),
                    "log": f"{report}/{slug(name)}.trials.json", **ctx.dev_options},
            "max_forgetting_pct": budget,
            "trials": int(params.get("trials", 40)),
            "seed": ctx.seed,
            "baselines": {n: _baseline(b, models, domains) for n, b in (params.get("baselines") or {}).items()},
            "study": {"storage": f"{report}/{slug(name)}.study.db", "name": f"experiment-{study}"},
            "plot": f"{report}/{slug(name)}.pareto.png",
            # a search that finds nothing within the budget still gives the report a row: its least-forgetting trial
            "if_infeasible": params.get("if_infeasible", "least_forgetting"),
        }

    return [Spec(name, key, needs=(GENERALIST, *models), recipe=build,
                 shape={k: v for k, v in params.items() if k != "name"})]
