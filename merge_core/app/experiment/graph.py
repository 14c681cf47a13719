"""An experiment's jobs as a graph: content-addressed, resumable, each started when what it
needs exists.

Every fine-tune, merge and evaluation is a :class:`Node` named by the file it writes,
whose name hashes everything that shapes it (an expert: its generalist's digest, its
domains, its training manifests, start model, settings and the toolkit's fine-tuning
config; a merge: its recipe, whose inputs' names hash theirs). A node whose file exists is
done and never redone; outputs are published atomically, so a file that exists is whole.
"""

from __future__ import annotations

import graphlib
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from merge_core.app.experiment.plan import DemoPlan, ExpertJob
from merge_core.app.experiment.procedures import GENERALIST, PROCEDURES, Context, Spec
from merge_core.app.experiment.schema import Experiment, Resources
from merge_core.atomic import write_text_atomically
from merge_core.checkpoint.provenance import file_sha256
from merge_core.errors import RecipeError
from merge_core.recipes import parse_recipe


@dataclass(frozen=True)
class Node:
    """One job: ``task()`` (called in the driver when the job starts, once what it needs
    exists) gives the module-level function and arguments a worker runs."""

    id: str  # the output's file name
    name: str  # the model's (a report row) or "eval <model>"
    kind: str  # finetune, merge or eval
    output: Path
    needs: tuple[str, ...]  # ids of the nodes whose outputs it reads
    task: Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]
    resources: Resources


@dataclass(frozen=True)
class Graph:
    nodes: Mapping[str, Node]  # in an order where every node comes after what it needs
    rows: tuple[tuple[str, Path], ...]  # the report's models, in the experiment file's order


def declared_specs(experiment: Experiment, ctx: Context) -> dict[str, Spec]:
    """Every model the procedures declare, by name; a name declared twice differently is refused."""
    specs: dict[str, Spec] = {}
    for key, name, params in experiment.procedures:
        for spec in PROCEDURES[name](params, ctx, key):
            earlier = specs.get(spec.name)
            if earlier is not None and (earlier.job != spec.job or earlier.recipe is not None or spec.recipe is not None):
                raise RecipeError(f"{spec.key}: model '{spec.name}' is already declared by {earlier.key}")
            if earlier is None or (spec.row and not earlier.row):
                specs[spec.name] = spec
    return specs


def resolution_order(specs: Mapping[str, Spec]) -> list[str]:
    """The specs' names, each after the models it needs; an undeclared name or a cycle is refused."""
    for spec in specs.values():
        for need in spec.needs:
            if need != GENERALIST and need not in specs:
                raise RecipeError(f"{spec.key}: '{need}' (needed by '{spec.name}') is not a model of this "
                                  f"experiment; declared: {sorted(specs)}")
    sorter = graphlib.TopologicalSorter({name: [n for n in s.needs if n != GENERALIST] for name, s in specs.items()})
    try:
        return list(sorter.static_order())
    except graphlib.CycleError as e:
        cycle = e.args[1]
        where = sorted({specs[n].key for n in cycle})
        raise RecipeError(f"{', '.join(where)}: the models {' -> '.join(cycle)} need each other (a cycle)") from None


def build_graph(experiment: Experiment, plan: DemoPlan, ctx: Context) -> Graph:
    """The experiment's nodes and report rows (refusing undeclared models and cycles)."""
    specs = declared_specs(experiment, ctx)
    paths: dict[str, str] = {GENERALIST: str(plan.generalist)}
    nodes: dict[str, Node] = {}
    exclude = {"exclude": list(plan.toolkit.merge_exclude)} if plan.toolkit.merge_exclude else {}
    for name in resolution_order(specs):
        spec = specs[name]
        if spec.job is not None:
            job = replace(spec.job, init=paths[spec.job.start]) if spec.job.start else spec.job
            node = finetune_node(plan, job, experiment.finetune.resources, name)
        else:
            assert spec.recipe is not None
            shape = {"inputs": [Path(paths[n]).name for n in spec.needs], "shape": spec.shape} if spec.shape \
                else by_file_names(spec.recipe(paths, ctx), [paths[n] for n in spec.needs])
            node = merge_node(plan, name, plan.merged_path(name, {**shape, **exclude}), spec, dict(paths), ctx, exclude)
        paths[name] = str(node.output)
        _add(nodes, node)
    rows = [(GENERALIST, plan.generalist)] + [(s.name, Path(paths[s.name])) for s in specs.values() if s.row]
    for row, model in rows:
        _add(nodes, eval_node(plan, experiment, row, model))
    return Graph(nodes, tuple(rows))


def by_file_names(recipe: dict[str, Any], inputs: list[str]) -> Any:
    """``recipe`` with its inputs' paths as their file names, which hash what shapes them:
    a merge's name does not change with where the storage is."""
    text = json.dumps(recipe, sort_keys=True, default=str)
    for path in sorted(inputs, key=len, reverse=True):
        text = text.replace(json.dumps(path)[1:-1], Path(path).name)
    return json.loads(text)


def _add(nodes: dict[str, Node], node: Node) -> None:
    """Add ``node``, needing the nodes that write its inputs (the others are the experiment's files)."""
    nodes.setdefault(node.id, replace(node, needs=tuple(n for n in node.needs if n in nodes)))


def finetune_node(plan: DemoPlan, job: ExpertJob, resources: Resources, name: str) -> Node:
    output = plan.expert_path(job)
    init = plan.init_of(job)
    return Node(output.name, name, "finetune", output, (init.name,),
                lambda: (train, (plan, job, resources.cpus)), resources)


def merge_node(plan: DemoPlan, name: str, output: Path, spec: Spec, paths: dict[str, str], ctx: Context,
               exclude: Mapping[str, Any]) -> Node:
    return Node(output.name, name, "merge", output, tuple(Path(paths[n]).name for n in spec.needs),
                lambda: (merge, ({**spec.recipe(paths, ctx), **exclude, "output": str(output)},)), Resources())


def eval_node(plan: DemoPlan, experiment: Experiment, row: str, model: Path) -> Node:
    """Decode every test set with one model into the storage's evaluation cache; the report
    then reads every transcript from there. Named by the model's file and the test sets' content."""
    manifests = test_manifests(experiment)
    key = hashlib.sha256(json.dumps({k: file_sha256(Path(v)) for k, v in manifests.items()}).encode()).hexdigest()[:12]
    output = plan.out / "evals" / f"{model.name}-{key}.json"
    config = {
        "models": [{"name": row, "model": str(model)}],
        "reference_model": row,
        "manifests": manifests,
        "forgetting_sets": list(experiment.evaluate.forgetting_sets),
        "output_dir": str(plan.out / "work" / "eval" / model.name),
        "cache_dir": str(eval_cache(plan)),
    }
    return Node(output.name, f"eval {row}", "eval", output, (model.name,),
                lambda: (evaluate_one, (plan, config, str(output))), experiment.evaluate.resources)


def eval_cache(plan: DemoPlan) -> Path:
    return plan.out / "eval-cache"


def test_manifests(experiment: Experiment) -> dict[str, str]:
    """The report's test sets: the original ones it measures forgetting on, then every domain's test set."""
    sets = {k: v for k, v in experiment.original.items() if k in experiment.evaluate.forgetting_sets}
    sets.update({d: s["test"] for d, s in experiment.domains.items()})
    return sets


# what workers run: module-level, so that a process pool or Ray can send them


def train(plan: DemoPlan, job: ExpertJob, threads: int) -> None:
    plan.toolkit.train_expert(plan, job, threads)


def merge(recipe: dict[str, Any]) -> None:
    """One merge of whatever kind, through the recipes' front door."""
    parse_recipe(recipe).run(progress=False)


def evaluate_one(plan: DemoPlan, config: dict[str, Any], output: str) -> None:
    report, _ = plan.toolkit.evaluate(plan, config)
    row = {k: v for k, v in report["models"][0].items() if k != "per_utterance"}
    write_text_atomically(Path(output), json.dumps(row, indent=2, default=str) + "\n")
