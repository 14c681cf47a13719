"""Running the demo: the synthetic corpus and its manifests, then the toolkit's demo
experiment file (:mod:`merge_core.app.experiment`), and the claims."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from merge_core.app.corpus import DOMAINS, prepare_librispeech, prepare_synthetic_corpus
from merge_core.app.experiment.plan import TARGETS, DemoPlan, DemoToolkit
from merge_core.app.experiment import load_experiment, run_experiment
from merge_core.atomic import write_text_atomically

# the search's trials per corpus size; each decodes every target domain's dev set and dev-clean once
SEARCH_TRIALS = {"smoke": 8, "default": 40, "large": 60}


def prepare_data(plan: DemoPlan) -> None:
    """The corpus (resumed if interrupted, reused if complete) and every domain's manifests."""
    prepare_synthetic_corpus(plan.corpus, size=plan.size.corpus, seed=plan.seed)
    for domain in DOMAINS:
        dest = plan.manifest(domain.name, "test").parent
        prepare_librispeech(plan.corpus / domain.name, dest, toolkit=plan.toolkit.name)


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
    full: bool = False,
    executor: str = "local",
) -> dict[str, Any]:
    """Run the demo (see the module docstring) with ``toolkit``: the corpus and its manifests,
    then the toolkit's demo experiment file (its optional procedures with ``full``); returns
    ``demo.json``'s content."""
    start = time.perf_counter()
    plan = make_plan(toolkit, size, out, corpus, generalist, seed, upweighted)
    prepare_data(plan)
    values: dict[str, Any] = {
        "storage": str(plan.out),
        "data_root": str(plan.corpus),
        "seed": seed,
        "run_optional": full,
        "executor": executor,
        "evaluate.upweighted": upweighted,
        "evaluate.note": size_note(size),
        "local.jobs": jobs,
        "vars.search_trials": SEARCH_TRIALS[plan.size.corpus],  # read by the files with a search
    }
    if generalist is not None:
        values["generalist"] = str(plan.generalist)
    summary = run_experiment(load_experiment(toolkit.experiment, values=values), size=plan.size)
    summary = {"toolkit": toolkit.name, "size": size, "note": size_note(size),
               "seconds": round(time.perf_counter() - start, 1), "cpus": os.cpu_count(),
               "report": summary["report"], "claims": summary["claims"]}
    write_text_atomically(plan.out / "demo.json", json.dumps(summary, indent=2) + "\n")
    for claim in summary["claims"]:
        print(f"[{claim['verdict'] if claim['verdict'] != 'fails' else 'FAILS'}] {claim['claim']}: {claim['numbers']}")
    print(f"demo ({size}) finished in {summary['seconds']:.0f} s; report in {plan.out / 'report'}")
    return summary
