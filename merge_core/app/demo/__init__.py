"""The AoDE demo, toolkit-free: experts fine-tuned from one generalist forget; their average does not.

``asr-merge demo`` runs, through the code paths a user runs on LibriSpeech:

1. the synthetic corpus (:func:`merge_core.app.corpus.prepare_synthetic_corpus`) and the
   toolkit's manifests of every domain;
2. one expert per target domain, fine-tuned from the toolkit's shipped generalist with
   LLRD + the slanted triangular schedule (snapshotted every epoch), the same with LoRA
   (folded back on export), and sequential fine-tuning through all domains in two orders
   (Plantinga et al., "Parameter Averaging Is All You Need to Prevent Forgetting": its
   Scenario 2);
3. that paper's merges (Tables VII and VIII) and its Scenario 3, iterative AoDE (each
   round's experts fine-tuned from the previous round's average, with and without the
   original);
4. sequential editing (Kulshreshtha et al., "Sequential Editing for Lifelong Training of
   Speech Recognition Models"): theta_t = theta_{t-1} + lambda * trim(theta_hat_t -
   theta_{t-1}) domain after domain, by task arithmetic and by TIES;
5. on the focus domain (``upweighted``), Ducorroy and Riad's "Robust fine-tuning of speech
   recognition models via model merging": MAST (its expert's last snapshots averaged),
   MAcT (runs with sampled hyper-parameters, each keeping its best dev-WER model,
   averaged) and SMAcT (Algorithm 1's greedy selection on the dev set);
6. the forgetting-budget search (``asr-merge search``): the merge of the single-domain
   experts with the lowest mean target-domain dev WER whose forgetting on dev-clean stays
   within 1 %, beside the fixed recipes it has to beat;
7. WER on every domain's test set and forgetting on ``test-clean`` + ``test-other``:
   ``report.{json,md,png}``, and ``demo.json`` with the papers' claims checked against
   the numbers.

A toolkit plugin names its demos (:attr:`merge_core.plugins.ToolkitPlugin.demos`), each a
:class:`DemoToolkit`: its generalist, how it fine-tunes one expert, its evaluation and
which :class:`Scenarios` it runs.

Experts are keyed by a hash of everything that shapes them (generalist, domains in
order, LoRA, the merged model they start from, sampled hyper-parameters, size
settings, seed, fine-tuning config), so a rerun reuses finished ones; every expert and
merge starts as soon as what it starts from exists, independent experts in parallel
processes.
"""

from merge_core.app.demo.claims import check_claims, flat_name
from merge_core.app.demo.plan import (
    ALL_SCENARIOS,
    DEMO_SIZES,
    FORGETTING_SETS,
    PRETRAINED_SCENARIOS,
    TARGETS,
    DemoPlan,
    DemoSize,
    DemoToolkit,
    ExpertJob,
    Scenarios,
    slug,
)
from merge_core.app.demo.runner import evaluation_rows, run_demo
from merge_core.app.demo.scenarios import (
    EDITS,
    MACT_RUNS,
    ROUNDS,
    SEARCH_BUDGET,
    SEARCH_ROW,
    all_jobs,
    edit_name,
    merge_steps,
    round_name,
)

__all__ = [
    "ALL_SCENARIOS",
    "DEMO_SIZES",
    "EDITS",
    "FORGETTING_SETS",
    "MACT_RUNS",
    "ROUNDS",
    "PRETRAINED_SCENARIOS",
    "SEARCH_BUDGET",
    "SEARCH_ROW",
    "TARGETS",
    "DemoPlan",
    "DemoSize",
    "DemoToolkit",
    "ExpertJob",
    "Scenarios",
    "all_jobs",
    "check_claims",
    "edit_name",
    "evaluation_rows",
    "flat_name",
    "merge_steps",
    "round_name",
    "run_demo",
    "slug",
]
