"""The demo's scenarios: every fine-tuning job and every merge, as the papers run them."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from merge_core.app.corpus.domains import ORIGINAL
from merge_core.app.demo.plan import TARGETS, DemoPlan, ExpertJob, slug
from merge_core.recipes.greedy_soup import METHOD as SOUP_METHOD
from merge_core.recipes.mact import sample_hyperparameters
from merge_core.recipes.search import METHOD as SEARCH_METHOD

MACT_RUNS = 4  # MAcT: runs on the focus domain, hyper-parameters from Ducorroy and Riad's ranges
MAST_LAST = 4  # MAST averages the last K per-epoch snapshots
ROUNDS = 3  # iterative AoDE: the 1st round is AoDE itself
SEARCH_BUDGET = 1.0  # % forgetting: the forgetting-budget search's row
SEARCH_ROW = f"search (<= {SEARCH_BUDGET:g}% forgetting)"
# trials per corpus size; each decodes every target domain's dev set and dev-clean once
SEARCH_TRIALS = {"smoke": 8, "default": 40, "large": 60}
# sequential editing (Kulshreshtha et al.): theta_t = theta_{t-1} + lambda * trim(theta_hat_t - theta_{t-1})
EDITS = {
    "TA": ("task_arithmetic", {"lambda": 0.4}),
    "TIES": ("ties", {"lambda": 0.6, "density": 0.5, "trim_scope": "model"}),
}


@dataclass(frozen=True)
class MergeStep:
    """One merge of the demo, run once every checkpoint in ``needs`` exists."""

    name: str
    needs: tuple[Path, ...]
    build: Callable[[], dict[str, Any]]  # the recipe without ``output``, built when it runs
    row: bool = True  # a row of the report (sequential editing's inner steps are not)


def mact_jobs(plan: DemoPlan) -> list[ExpertJob]:
    rng = random.Random(plan.seed)
    return [ExpertJob((plan.upweighted,), hyper=sample_hyperparameters(rng)) for _ in range(MACT_RUNS)]


def round_name(variant: str, k: int) -> str:
    """Iterative AoDE's k-th round of ``variant`` (``AoDE`` or ``AoDE with orig``)."""
    return variant if k == 1 else f"{variant} r{k}"


def round_jobs(variant: str, k: int) -> list[ExpertJob]:
    """Round k's experts: every domain fine-tuned again from round k-1's average."""
    return [ExpertJob((d,), start=round_name(variant, k - 1)) for d in TARGETS]


def edit_name(label: str, k: int) -> str:
    return f"sequential editing {label}" if k == len(TARGETS) else f"sequential editing {label} step {k}"


def edit_job(label: str, k: int) -> ExpertJob:
    """theta_hat_k: domain k fine-tuned from the edited theta_{k-1} (theta_hat_1 is the single expert)."""
    return ExpertJob((TARGETS[k - 1],), start=edit_name(label, k - 1) if k > 1 else None)


def all_jobs(plan: DemoPlan) -> list[ExpertJob]:
    """Every fine-tuning of the demo: single-domain experts, sequential fine-tuning in the
    domains' order and its reverse (whose first steps are the single experts), and, as
    the toolkit's :class:`Scenarios` say, LoRA experts, experts without LLRD, the MAcT
    runs, iterative AoDE's rounds and sequential editing's steps."""
    scenarios = plan.toolkit.scenarios
    orders = (TARGETS, TARGETS[::-1])
    jobs = [ExpertJob((d,)) for d in TARGETS]
    if scenarios.lora:
        jobs += [ExpertJob((d,), lora=True) for d in TARGETS]
    if scenarios.llrd_ablation:
        jobs += [ExpertJob((d,), llrd=False) for d in TARGETS]
    jobs += [ExpertJob(order[:k]) for k in range(2, len(TARGETS) + 1) for order in orders]
    if scenarios.trajectories:
        jobs += mact_jobs(plan)
    if scenarios.iterative:
        jobs += [j for variant in ("AoDE", "AoDE with orig") for k in range(2, ROUNDS + 1) for j in round_jobs(variant, k)]
    if scenarios.editing:
        jobs += [edit_job(label, k) for label in EDITS for k in range(2, len(TARGETS) + 1)]
    return jobs


def _static(name: str, recipe: dict[str, Any], row: bool = True) -> MergeStep:
    needs = (Path(recipe["base_model"]), *(Path(m["model"] if isinstance(m, dict) else m) for m in recipe["models"]))
    return MergeStep(name, needs, lambda: recipe, row)


def mast_step(plan: DemoPlan) -> MergeStep:
    """MAST: the focus domain's expert trajectory, its last :data:`MAST_LAST` snapshots averaged."""
    job = ExpertJob((plan.upweighted,))
    expert, snapshots = plan.expert_path(job), plan.snapshot_dir(job)

    def build() -> dict[str, Any]:
        last = sorted(snapshots.glob("*.safetensors"))[-MAST_LAST:]
        return {"method": "average", "base_model": str(expert), "models": [str(p) for p in last]}

    return MergeStep(f"MAST {plan.upweighted}", (expert,), build)


def merge_steps(plan: DemoPlan) -> list[MergeStep]:
    """The AoDE paper's Tables VII and VIII and, as the toolkit's :class:`Scenarios` say,
    iterative AoDE, sequential editing, MAST, MAcT and SMAcT, in the report's row order."""
    scenarios = plan.toolkit.scenarios
    experts = [str(plan.expert_path(ExpertJob((d,)))) for d in TARGETS]
    base = str(plan.generalist)
    upweighted = [{"model": m, "weight": 4.0 if d == plan.upweighted else 1.0} for d, m in zip(TARGETS, experts)]
    recipes = {
        "AoDE": {"method": "average", "models": experts},
        "AoDE with orig": {"method": "average", "models": experts, "include_base": True},
        "AoDE LoRA": {"method": "average", "models": [str(plan.expert_path(ExpertJob((d,), lora=True))) for d in TARGETS]},
        f"AoDE {plan.upweighted} x4": {"method": "average", "models": upweighted},
        "original x4": {"method": "average", "models": experts, "include_base": True, "base_weight": 4.0},
        "TIES": {"method": "ties", "models": experts, "parameters": {"density": 0.2, "lambda": 1.0}},
        "task arithmetic": {"method": "task_arithmetic", "models": experts, "parameters": {"lambda": 0.4}},
    }
    if not scenarios.lora:
        del recipes["AoDE LoRA"]
    for variant in ("AoDE", "AoDE with orig") if scenarios.iterative else ():
        for k in range(2, ROUNDS + 1):
            recipes[round_name(variant, k)] = {
                "method": "average",
                "models": [str(plan.expert_path(j)) for j in round_jobs(variant, k)],
                "include_base": variant == "AoDE with orig",
            }
    steps = [_static(name, {**recipe, "base_model": base}) for name, recipe in recipes.items()]
    if scenarios.search:  # beside the fixed recipes it has to beat
        steps.insert(list(recipes).index("task arithmetic") + 1, search_step(plan, recipes))
    for label, (method, parameters) in EDITS.items() if scenarios.editing else ():
        for k in range(1, len(TARGETS) + 1):
            previous = str(plan.merged_path(edit_name(label, k - 1))) if k > 1 else base
            recipe = {"method": method, "base_model": previous, "models": [str(plan.expert_path(edit_job(label, k)))],
                      "parameters": parameters}
            steps.append(_static(edit_name(label, k), recipe, row=k == len(TARGETS)))
    if scenarios.trajectories:
        steps.append(mast_step(plan))
        runs = [str(plan.expert_path(j)) for j in mact_jobs(plan)]
        steps.append(_static(f"MAcT {plan.upweighted}", {"method": "average", "base_model": base, "models": runs}))
        smact = smact_candidates(plan)
        steps.append(MergeStep(f"SMAcT {plan.upweighted}", tuple(map(Path, smact)), lambda: smact_recipe(plan, smact)))
    return steps


def smact_candidates(plan: DemoPlan) -> list[str]:
    """SMAcT's candidates in order: the focus domain's plain fine-tuning, then its MAcT runs."""
    return [str(plan.expert_path(j)) for j in (ExpertJob((plan.upweighted,)), *mact_jobs(plan))]


def smact_recipe(plan: DemoPlan, candidates: list[str]) -> dict[str, Any]:
    """SMAcT (Ducorroy and Riad, Algorithm 1): each candidate kept only if the soup's WER on the
    focus domain's dev set drops; the trials are logged beside the report."""
    name = f"SMAcT {plan.upweighted}"
    dev = {"manifest": str(plan.manifest(plan.upweighted, "dev")), "log": str(plan.out / "report" / f"{slug(name)}.trials.json")}
    return {
        "method": SOUP_METHOD,
        "base_model": str(plan.generalist),
        "models": candidates,
        "dev": {**dev, **plan.toolkit.dev_options(plan)},
    }


def search_baselines(plan: DemoPlan, recipes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The report's fixed recipes of the single-domain experts, as the search's ``baselines``:
    enqueued first, marked in its plot (re-weighted AoDE as weights relative to the focus
    domain's, which an average does not tell apart from x4)."""
    ties, ta = recipes["TIES"]["parameters"], recipes["task arithmetic"]["parameters"]
    return {
        "AoDE": {"method": "average"},
        "AoDE with orig": {"method": "average", "base_weight": 1.0},
        f"AoDE {plan.upweighted} x4": {"method": "average", "weights": {d: 1.0 if d == plan.upweighted else 0.25 for d in TARGETS}},
        "original x4": {"method": "average", "base_weight": 4.0},
        "TIES": {"method": "ties", "lambda": ties["lambda"], "density": ties["density"]},
        "task arithmetic": {"method": "task_arithmetic", "lambda": ta["lambda"]},
    }


def search_step(plan: DemoPlan, recipes: dict[str, dict[str, Any]]) -> MergeStep:
    """The forgetting-budget search (``asr-merge search``) over the single-domain experts: the
    lowest mean target-domain dev WER whose forgetting on dev-clean stays within
    :data:`SEARCH_BUDGET`; its trials, plot and study beside the report."""
    experts = [plan.expert_path(ExpertJob((d,))) for d in TARGETS]
    report = plan.out / "report"

    def build() -> dict[str, Any]:
        # the study is named by the experts it searches (their names hash all that shapes them):
        # new experts start a new study, a rerun of the demo resumes this one
        key = hashlib.sha256(json.dumps([e.name for e in experts]).encode()).hexdigest()[:12]
        return {
            "method": SEARCH_METHOD,
            "base_model": str(plan.generalist),
            "models": [{"model": str(e), "name": d} for d, e in zip(TARGETS, experts)],
            "dev": {
                "sets": {d: str(plan.manifest(d, "dev")) for d in TARGETS},
                "original": {"dev_clean": str(plan.manifest(ORIGINAL, "dev-clean"))},
                "log": str(report / f"{slug(SEARCH_ROW)}.trials.json"),
                **plan.toolkit.dev_options(plan),
            },
            "max_forgetting_pct": SEARCH_BUDGET,
            "trials": SEARCH_TRIALS[plan.size.corpus],
            "seed": plan.seed,
            "baselines": search_baselines(plan, recipes),
            "study": {"storage": str(report / f"{slug(SEARCH_ROW)}.study.db"), "name": f"demo-{key}"},
            "plot": str(report / f"{slug(SEARCH_ROW)}.pareto.png"),
            # a search that finds nothing within the budget still gives the report a row: its least-forgetting trial
            "if_infeasible": "least_forgetting",
        }

    return MergeStep(SEARCH_ROW, tuple(experts), build)
