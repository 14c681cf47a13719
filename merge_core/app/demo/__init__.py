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

What it runs is the toolkit's demo experiment file (``configs/experiments/demo_*.yaml``,
run by :mod:`merge_core.app.experiment`): by default the AoDE paper's core (steps 1, 2
without LoRA, 3's Tables VII and VIII, 7); ``--full`` adds the procedures marked optional
(LoRA, iterative AoDE, sequential editing, MAST/MAcT/SMAcT, the search).

A toolkit plugin names its demos (:attr:`merge_core.plugins.ToolkitPlugin.demos`), each a
:class:`DemoToolkit`: its generalist, how it fine-tunes one expert, its evaluation and
its experiment file. Every job is keyed by a hash of everything that shapes it, so a
rerun reuses finished ones; every job starts as soon as what it needs exists.
"""

from merge_core.app.demo.claims import EDITS, ROUNDS, SEARCH_BUDGET, SEARCH_ROW, check_claims, flat_name
from merge_core.app.experiment.plan import (
    DEMO_SIZES,
    FORGETTING_SETS,
    TARGETS,
    DemoPlan,
    DemoSize,
    DemoToolkit,
    ExpertJob,
    slug,
)
from merge_core.app.demo.runner import run_demo

__all__ = [
    "DEMO_SIZES",
    "EDITS",
    "FORGETTING_SETS",
    "ROUNDS",
    "SEARCH_BUDGET",
    "SEARCH_ROW",
    "TARGETS",
    "DemoPlan",
    "DemoSize",
    "DemoToolkit",
    "ExpertJob",
    "check_claims",
    "flat_name",
    "run_demo",
    "slug",
]
