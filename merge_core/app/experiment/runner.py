"""Running an experiment: checks, the graph, its jobs on an executor, then the report.

Nothing starts before the whole file is checked: every key, every manifest, every
procedure, every model a procedure names, and the graph's order (no cycle). Then every job
whose output is not in ``storage`` runs when what it needs exists; a failed job stops only
what depends on it, and the run ends with the failed jobs and their logs (non-zero exit).
The report (``<storage>/report/report.{json,md,png}``) reads every transcript from the
evaluation cache the jobs wrote.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from merge_core.app.corpus.domains import ORIGINAL
from merge_core.app.experiment.plan import DemoPlan, DemoSize, DemoToolkit, ExpertJob
from merge_core.app.experiment.executors import Executor
from merge_core.app.experiment.graph import Graph, Node, build_graph, eval_cache, finetune_node, test_manifests
from merge_core.app.experiment.procedures import GENERALIST, Context
from merge_core.app.experiment.progress import Progress
from merge_core.app.experiment.schema import Experiment, Resources, missing_files
from merge_core.atomic import write_text_atomically
from merge_core.errors import MergeError, RecipeError
from merge_core.plugins import toolkit


class ExperimentFailed(MergeError):
    """Jobs failed: the message names them and their logs."""


def demo_toolkit(experiment: Experiment) -> DemoToolkit:
    """The toolkit's fine-tuning and evaluation: the demo named ``generalist`` (Whisper tiny.en) or its default."""
    plugin = toolkit(experiment.toolkit)
    name = experiment.generalist if experiment.generalist in plugin.demos else "default"
    return plugin.load(plugin.demos[name], f"experiments with {plugin.name} models")


def make_plan(experiment: Experiment, tk: DemoToolkit, size: DemoSize | None = None) -> DemoPlan:
    """The plan every job reads: storage, generalist, manifests, fine-tuning settings."""
    storage = experiment.storage
    given = experiment.generalist
    if given is None or given in toolkit(experiment.toolkit).demos:
        generalist = tk.generalist if tk.prepare_generalist is None else tk.prepare_generalist(storage)
    else:
        generalist = Path(given).resolve()
        if not generalist.exists():
            raise RecipeError(f"experiment key 'generalist': {given} not found")
    ft = experiment.finetune
    size = size or DemoSize("experiment", epochs=ft.epochs, max_steps=ft.max_steps, batch_size=ft.batch_size,
                            lr=ft.lr, lora_lr=ft.lora_lr, train_utterances=ft.train_utterances)
    manifests: dict[str, Mapping[str, str]] = dict(experiment.domains)
    manifests[ORIGINAL] = {**experiment.original, "dev": experiment.original.get("dev_clean", ""),
                           "train": experiment.original.get("train_clean_100", "")}
    finetune = {k: v for k, v in (("config", ft.config), ("overrides", dict(ft.overrides))) if v}
    first = next(iter(experiment.domains))
    return DemoPlan(tk, storage, Path(experiment.data_root or storage).resolve(), Path(generalist), size,
                    experiment.seed, experiment.evaluate.upweighted or first, manifests, finetune)


def context(experiment: Experiment, plan: DemoPlan) -> Context:
    return Context(
        domains=tuple(experiment.domains),
        seed=experiment.seed,
        report_dir=str(plan.out / "report"),
        dev_manifest=lambda d: experiment.domains[d]["dev"],
        original_dev={k: v for k, v in experiment.original.items() if k.startswith("dev")},
        dev_options=plan.toolkit.dev_options(plan),
    )


def make_executor(experiment: Experiment) -> Executor:
    """The experiment's executor; ``local`` runs as many jobs at once as the cores hold (each job
    holds ``cpus`` of them) unless ``local.jobs`` says."""
    if experiment.executor == "ray":
        from merge_core.app.experiment.executors.ray import RayExecutor

        return RayExecutor(experiment.ray)
    from merge_core.app.experiment.executors.local import LocalExecutor

    cpus = max(experiment.finetune.resources.cpus, experiment.evaluate.resources.cpus)
    return LocalExecutor(int(experiment.local.get("jobs") or max(1, (os.cpu_count() or 1) // cpus)))


def schedule(nodes: Mapping[str, Node], executor: Executor, progress: Progress, logs: Path) -> dict[str, str]:
    """Run every node whose output is missing, each once what it needs is done (no more at once
    than the executor's ``capacity``: a job counts as running from when it starts); a failed
    node's dependents are skipped. Returns every node's final state."""
    states = {i: "done" if n.output.exists() else "waiting" for i, n in nodes.items()}
    running = 0
    try:
        while True:
            for node_id, state in list(states.items()):
                if state != "waiting":
                    continue
                needs = [states[n] for n in nodes[node_id].needs]
                if any(s in ("failed", "skipped") for s in needs):
                    states[node_id] = "skipped"
                    progress.event(nodes[node_id], "skipped", " (what it needs failed)")
                elif all(s == "done" for s in needs) and running < (executor.capacity or len(nodes)):
                    fn, args = nodes[node_id].task()
                    executor.submit(nodes[node_id], fn, args, logs / f"{node_id}.log")
                    states[node_id] = "running"
                    running += 1
                    progress.event(nodes[node_id], "running")
            if "running" not in states.values():
                break
            for node_id, error in executor.wait(timeout=1.0):
                node = nodes[node_id]
                if error is None and not node.output.exists():
                    error = f"ended without writing {node.output}"
                states[node_id] = "done" if error is None else "failed"
                running -= 1
                progress.event(node, states[node_id], f": {error}" if error else "")
            progress.refresh(states)
    except BaseException:  # interrupted: no job outlives the driver
        executor.close(cancel=True)
        raise
    executor.close(cancel=False)
    return states


def run_graph(experiment: Experiment, graph: Graph, executor: Executor, live: bool | None = None) -> dict[str, str]:
    """Run ``graph``'s jobs on ``executor``; failed jobs raise :class:`ExperimentFailed`."""
    storage = experiment.storage
    logs = storage / "logs"
    todo = sum(not n.output.exists() for n in graph.nodes.values())
    print(f"{experiment.name}: {len(graph.nodes)} jobs, {len(graph.nodes) - todo} already done; "
          f"executor {experiment.executor}; log {storage / 'experiment.log'}", flush=True)
    progress = Progress(graph.nodes, storage / "experiment.log", logs, live)
    try:
        states = schedule(graph.nodes, executor, progress, logs)
    finally:
        progress.close()
    failed = [graph.nodes[i] for i, s in states.items() if s == "failed"]
    if failed:
        skipped = sum(s == "skipped" for s in states.values())
        lines = [f"  {n.kind} {n.name}: log {logs / (n.id + '.log')}" for n in failed]
        raise ExperimentFailed(f"{len(failed)} job(s) failed ({skipped} skipped as they needed them):\n" + "\n".join(lines))
    return states


def run_experiment(experiment: Experiment, size: DemoSize | None = None, live: bool | None = None) -> dict[str, Any]:
    """Check, plan and run ``experiment``, then its report; returns ``experiment.json``'s content."""
    start = time.perf_counter()
    missing = missing_files(experiment)
    if missing:
        raise RecipeError("the experiment's files are missing (nothing was started):\n  " + "\n  ".join(missing))
    tk = demo_toolkit(experiment)
    plan = make_plan(experiment, tk, size)
    graph = build_graph(experiment, plan, context(experiment, plan))
    run_graph(experiment, graph, make_executor(experiment), live)
    report, files = tk.evaluate(plan, {
        "models": [{"name": name, "model": str(path)} for name, path in graph.rows],
        "reference_model": GENERALIST,
        "manifests": test_manifests(experiment),
        "forgetting_sets": list(experiment.evaluate.forgetting_sets),
        "output_dir": str(plan.out / "report"),
        "cache_dir": str(eval_cache(plan)),
        "note": experiment.evaluate.note,
    })
    summary = {
        "experiment": experiment.name,
        "toolkit": experiment.toolkit,
        "executor": experiment.executor,
        "seconds": round(time.perf_counter() - start, 1),
        "cpus": os.cpu_count(),
        "report": {kind: str(path) for kind, path in files.items()},
    }
    if experiment.evaluate.claims:
        from merge_core.app.demo.claims import check_claims  # the demo's findings: the demo package imports this one

        summary["claims"] = check_claims(report, plan.upweighted)
    write_text_atomically(plan.out / "experiment.json", json.dumps(summary, indent=2) + "\n")
    print(f"{experiment.name} finished in {summary['seconds']:.0f} s; report in {plan.out / 'report'}")
    return summary


def train_experts(plan: DemoPlan, jobs: list[ExpertJob], workers: int) -> list[Path]:
    """Fine-tune ``jobs`` (each starting from the generalist or an existing model) not already
    in ``plan.out``, ``workers`` at a time; their checkpoints."""
    from merge_core.app.experiment.executors.local import LocalExecutor

    cpus = max(1, (os.cpu_count() or 1) // max(1, workers))
    # each starts from a model that exists already: none needs another
    nodes = {n.id: replace(n, needs=()) for n in (finetune_node(plan, j, Resources(cpus=cpus), j.name) for j in jobs)}
    todo = sum(not n.output.exists() for n in nodes.values())
    print(f"experts: {todo} to train, {len(nodes) - todo} reused")
    progress = Progress(nodes, plan.out / "experiment.log", plan.out / "logs", live=False)
    try:
        states = schedule(nodes, LocalExecutor(workers), progress, plan.out / "logs")
    finally:
        progress.close()
    failed = [nodes[i].name for i, s in states.items() if s == "failed"]
    if failed:
        raise ExperimentFailed(f"fine-tuning failed: {failed}; logs in {plan.out / 'logs'}")
    return [n.output for n in nodes.values()]
