"""Running the demo: data, every expert and merge as soon as what it starts from exists,
the evaluation, and the claims."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from merge_core.app.corpus import DOMAINS, prepare_librispeech, prepare_synthetic_corpus
from merge_core.app.corpus.domains import ORIGINAL
from merge_core.app.demo.claims import check_claims, flat_name
from merge_core.app.demo.plan import FORGETTING_SETS, TARGETS, DemoPlan, DemoToolkit, ExpertJob
from merge_core.app.demo.scenarios import MergeStep, all_jobs, merge_steps
from merge_core.atomic import write_text_atomically
from merge_core.recipes import parse_recipe

def prepare_data(plan: DemoPlan) -> None:
    """The corpus (resumed if interrupted, reused if complete) and every domain's manifests."""
    prepare_synthetic_corpus(plan.corpus, size=plan.size.corpus, seed=plan.seed)
    for domain in DOMAINS:
        dest = plan.manifest(domain.name, "test").parent
        prepare_librispeech(plan.corpus / domain.name, dest, toolkit=plan.toolkit.name)


def run_merge(recipe: dict[str, Any]) -> None:
    """One merge of the demo, of whatever kind, through the recipes' front door."""
    parse_recipe(recipe).run(progress=False)


def train_jobs(plan: DemoPlan, jobs: list[ExpertJob], workers: int, bar: tqdm) -> None:
    """Train ``jobs`` (independent of each other), ``workers`` processes at a time."""
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    context = multiprocessing.get_context("spawn")  # a forked toolkit with live torch threads can deadlock
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        for _ in pool.map(plan.toolkit.train_expert, [plan] * len(jobs), jobs, [threads] * len(jobs)):
            bar.update()


def run_pipeline(plan: DemoPlan, jobs: list[ExpertJob], steps: list[MergeStep], workers: int) -> None:
    """Train every expert not already on disk and run every merge, each as soon as what it
    starts from exists: merges first (a round's average starts the next round), then all
    trainable experts at once."""
    todo = [j for j in jobs if not plan.expert_path(j).exists()]
    print(f"experts: {len(todo)} to train, {len(jobs) - len(todo)} reused; merges: {len(steps)}")
    pending = list(steps)
    with tqdm(total=len(todo), desc="experts", unit="model") as bar:
        while todo or pending:
            ready = [s for s in pending if all(p.exists() for p in s.needs)]
            exclude = {"exclude": list(plan.toolkit.merge_exclude)} if plan.toolkit.merge_exclude else {}
            for step in ready:
                run_merge({**step.build(), **exclude, "output": str(plan.merged_path(step.name))})
                pending.remove(step)
            trainable = [j for j in todo if plan.init_of(j).exists()]
            if trainable:
                train_jobs(plan, trainable, workers, bar)
                for job in trainable:
                    if not plan.expert_path(job).exists():
                        raise RuntimeError(f"fine-tuning {job.name} ended without writing {plan.expert_path(job)}")
                todo = [j for j in todo if j not in trainable]
            elif not ready:
                missing = sorted({str(p) for s in pending for p in s.needs if not p.exists()})
                raise RuntimeError(f"demo pipeline stuck: nothing can start; missing {missing[:3]}")


def evaluation_rows(plan: DemoPlan, steps: list[MergeStep]) -> list[dict[str, str]]:
    """The report's rows in Table VII's order: pretrained, fine-tunes, sequential, merges."""
    rows = [{"name": "pretrained", "model": str(plan.generalist)}]
    rows += [{"name": f"FT {d}", "model": str(plan.expert_path(ExpertJob((d,))))} for d in TARGETS]
    if plan.toolkit.scenarios.llrd_ablation:
        rows += [{"name": flat_name(d), "model": str(plan.expert_path(ExpertJob((d,), llrd=False)))} for d in TARGETS]
    for order in (TARGETS, TARGETS[::-1]):
        rows.append({"name": "sequential " + ">".join(order), "model": str(plan.expert_path(ExpertJob(order)))})
    rows += [{"name": s.name, "model": str(plan.merged_path(s.name))} for s in steps if s.row]
    return rows


def make_plan(
    toolkit: DemoToolkit,
    size: str,
    out: str | Path | None,
    corpus: str | Path | None,
    generalist: str | Path | None,
    seed: int,
    upweighted: str,
) -> DemoPlan:
    """A run's plan: ``out`` defaults to ``outputs/demo/<toolkit>-<size>``, the corpus to
    ``<out>/corpus``, the generalist to the toolkit's shipped (or prepared) one."""
    out = Path(out or f"outputs/demo/{toolkit.label or toolkit.name}-{size}").resolve()
    if generalist is None and toolkit.prepare_generalist is not None:
        generalist = toolkit.prepare_generalist(out)
    return DemoPlan(toolkit, out, Path(corpus or out / "corpus").resolve(),
                    Path(generalist or toolkit.generalist).resolve(), toolkit.sizes[size], seed, upweighted)


SMOKE_NOTE = "smoke-size run: these numbers are not meant to be read (a few utterances per set, experts barely trained)"


def size_note(size: str) -> str | None:
    """The note a report of a demo of ``size`` carries: the smoke size's warning, else none.

    >>> size_note("default") is None, size_note("smoke") == SMOKE_NOTE
    (True, True)
    """
    return SMOKE_NOTE if size == "smoke" else None


def run_demo(
    toolkit: DemoToolkit,
    size: str = "default",
    out: str | Path | None = None,
    corpus: str | Path | None = None,
    generalist: str | Path | None = None,
    jobs: int | None = None,
    seed: int = 0,
    upweighted: str = TARGETS[0],
) -> dict[str, Any]:
    """Run the whole demo (see the module docstring) with ``toolkit``; returns ``demo.json``'s content."""
    start = time.perf_counter()
    plan = make_plan(toolkit, size, out, corpus, generalist, seed, upweighted)
    out = plan.out
    prepare_data(plan)
    steps = merge_steps(plan)
    run_pipeline(plan, all_jobs(plan), steps, jobs or max(1, os.cpu_count() or 1))
    manifests = {s.replace("-", "_"): plan.manifest(ORIGINAL, s) for s in ("test-clean", "test-other")}
    manifests.update({d: plan.manifest(d, "test") for d in TARGETS})
    report, files = toolkit.evaluate(plan, {
        "models": evaluation_rows(plan, steps),
        "reference_model": "pretrained",
        "manifests": {k: str(v) for k, v in manifests.items()},
        "forgetting_sets": list(FORGETTING_SETS),
        "output_dir": str(out / "report"),
        "note": size_note(size),
    })
    summary = {
        "toolkit": toolkit.name,
        "size": size,
        "note": size_note(size),
        "seconds": round(time.perf_counter() - start, 1),
        "cpus": os.cpu_count(),
        "report": {kind: str(path) for kind, path in files.items()},
        "claims": check_claims(report, upweighted),
    }
    write_text_atomically(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    for claim in summary["claims"]:
        print(f"[{claim['verdict'] if claim['verdict'] != 'fails' else 'FAILS'}] {claim['claim']}: {claim['numbers']}")
    print(f"demo ({size}) finished in {summary['seconds']:.0f} s; report in {out / 'report'}")
    return summary
