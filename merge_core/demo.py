"""The AoDE demo, toolkit-free: experts fine-tuned from one generalist forget; their average does not.

``asr-merge demo`` runs, through the code paths a user runs on LibriSpeech:

1. the synthetic corpus (:func:`merge_core.corpus.prepare_synthetic_corpus`) and the
   toolkit's manifests of every domain;
2. one expert per target domain, fine-tuned from the toolkit's shipped generalist with
   the paper's LLRD + slanted triangular schedule (snapshotted every epoch), the same
   with LoRA (folded back on export), and sequential fine-tuning through all domains in
   two orders (seed 000's Scenario 2);
3. the merges of seed 000's Tables VII and VIII by :func:`merge_core.engine.merge`, and
   its Scenario 3: iterative AoDE (each round's experts fine-tuned from the previous
   round's average, with and without the original);
4. sequential editing (seed 004): theta_t = theta_{t-1} + lambda * trim(theta_hat_t -
   theta_{t-1}) domain after domain, by task arithmetic and by TIES;
5. seed 002 on the focus domain (``upweighted``): MAST (its expert's last snapshots
   averaged), MAcT (runs with sampled hyper-parameters, each keeping its best dev-WER
   model, averaged) and SMAcT (Algorithm 1's greedy selection on the dev set);
6. WER on every domain's test set and forgetting on ``test-clean`` + ``test-other``:
   ``report.{json,md,png}``, and ``demo.json`` with the papers' claims checked against
   the numbers.

A toolkit adapter supplies a :class:`DemoToolkit`: its generalist, how it fine-tunes one
expert, its evaluation and which :class:`Scenarios` it runs (``nemo_merge.demo.NEMO``,
``speechbrain_merge.demo.SPEECHBRAIN``; ``speechbrain_merge.whisper_demo.WHISPER``, a real
pretrained Whisper with seed 000's scenarios and the LLRD ablation).

Experts are keyed by a hash of everything that shapes them (generalist, domains in
order, LoRA, the merged model they start from, sampled hyper-parameters, size
settings, seed, fine-tuning config), so a rerun reuses finished ones; every expert and
merge starts as soon as what it starts from exists, independent experts in parallel
processes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from merge_core.corpus import DOMAINS, prepare_librispeech, prepare_synthetic_corpus
from merge_core.corpus.domains import ORIGINAL
from merge_core.corpus.files import write_text_atomically
from merge_core.corpus.librispeech import manifest_name
from merge_core.engine import merge
from merge_core.mact import sample_hyperparameters
from merge_core.provenance import file_sha256
from merge_core.recipe import Recipe
from merge_core.soup import METHOD as SOUP_METHOD
from merge_core.soup import SoupRecipe, run_greedy_soup

TARGETS = tuple(d.name for d in DOMAINS if d.name != ORIGINAL)
FORGETTING_SETS = ("test_clean", "test_other")


@dataclass(frozen=True)
class DemoSize:
    """How big a demo run is: the corpus size and each expert's fine-tuning."""

    corpus: str
    epochs: int
    max_steps: int  # -1: as many as the epochs take (NeMo only: SpeechBrain counts epochs)
    batch_size: int
    lr: float  # the top encoder layer's peak rate (LLRD scales the others)
    lora_lr: float
    train_utterances: int | None = None  # the first N of each domain's training set (None: all)


DEMO_SIZES = {
    "smoke": DemoSize("smoke", epochs=1, max_steps=2, batch_size=4, lr=1e-3, lora_lr=3e-3),
    "default": DemoSize("default", epochs=8, max_steps=-1, batch_size=16, lr=1e-3, lora_lr=3e-3),
    "large": DemoSize("large", epochs=10, max_steps=-1, batch_size=32, lr=5e-4, lora_lr=2e-3),
}


@dataclass(frozen=True)
class ExpertJob:
    """A model fine-tuned on ``chain``'s domains, one after another.

    It starts from the generalist, or from the merged model named ``start`` (iterative
    AoDE's rounds, sequential editing's steps); ``hyper`` holds hyper-parameters sampled
    for a MAcT run (:data:`merge_core.mact.RANGES`), whose best model on the domain's dev set is kept.
    """

    chain: tuple[str, ...]
    lora: bool = False
    start: str | None = None
    hyper: tuple[tuple[str, float], ...] = ()
    llrd: bool = True  # False: one learning rate for every layer (seed 000's LLRD ablation)

    @property
    def name(self) -> str:
        name = ("lora-" if self.lora else "ft-" if self.llrd else "flat-") + "-".join(self.chain)
        if self.start:
            name += "@" + slug(self.start)
        if self.hyper:
            name += "-mact-" + hashlib.sha256(json.dumps(self.hyper).encode()).hexdigest()[:6]
        return name

    @property
    def parent(self) -> "ExpertJob | None":
        """The job whose output this one starts from (``None``: the generalist or ``start``)."""
        return replace(self, chain=self.chain[:-1]) if len(self.chain) > 1 else None

    @property
    def snapshots(self) -> bool:
        """Single-domain experts snapshot their trajectory once per epoch (for MAST)."""
        return len(self.chain) == 1 and self.llrd and not (self.lora or self.start or self.hyper)

    @property
    def keeps_best(self) -> bool:
        """MAcT runs keep their best model on the dev set; the others their last."""
        return bool(self.hyper)


def slug(name: str) -> str:
    """A row name as a file-name part: ``AoDE with orig r2`` -> ``AoDE_with_orig_r2``."""
    return name.replace(" ", "_").replace(">", "-")


@dataclass(frozen=True)
class Scenarios:
    """Which of the demo's scenarios a toolkit runs besides seed 000's core (single-domain
    fine-tunes, sequential fine-tuning, AoDE with and without the original, re-weighted
    AoDE, TIES and task arithmetic)."""

    lora: bool = True  # AoDE of LoRA experts
    iterative: bool = True  # iterative AoDE's rounds
    editing: bool = True  # sequential editing (seed 004)
    trajectories: bool = True  # MAST, MAcT, SMAcT (seed 002)
    llrd_ablation: bool = False  # single-domain fine-tunes without LLRD


ALL_SCENARIOS = Scenarios()
# a real pretrained generalist: seed 000's Whisper rows, and whether LLRD helps
SEED000_SCENARIOS = Scenarios(lora=False, iterative=False, editing=False, trajectories=False, llrd_ablation=True)


@dataclass(frozen=True)
class DemoToolkit:
    """What a toolkit adapter gives the demo. Its functions are module-level, so that
    expert processes can receive them."""

    name: str  # "nemo" or "speechbrain": also the manifests' kind
    generalist: Path | None  # the shipped generalist checkpoint (None: prepare_generalist writes one)
    prefix: str  # of a checkpoint's file or folder name: "CKPT+" for SpeechBrain
    suffix: str  # ".nemo"
    # (plan, job, torch threads) -> checkpoint; also writes plan.snapshot_dir(job)'s
    # snapshots once per epoch when it is not None, and applies job.hyper (MAcT)
    train_expert: Callable[["DemoPlan", ExpertJob, int], Path]
    evaluate: Callable[["DemoPlan", dict[str, Any]], tuple[dict[str, Any], dict[str, Path]]]  # config -> report, files
    dev_options: Callable[["DemoPlan"], dict[str, Any]]  # a greedy soup's toolkit keys in its ``dev`` section
    fingerprint: dict[str, Any]  # what else shapes an expert: fine-tuning config, LoRA settings
    sizes: dict[str, DemoSize] = field(default_factory=lambda: DEMO_SIZES)
    scenarios: Scenarios = ALL_SCENARIOS
    # out folder -> the generalist checkpoint, written there when it is not shipped as one
    prepare_generalist: Callable[[Path], Path] | None = None
    label: str = ""  # of the default output folder, outputs/demo/<label or name>-<size>
    # tensors every merge copies from its base_model: those no expert trains (a frozen encoder)
    merge_exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class DemoPlan:
    """Where a run reads and writes, and what shapes its experts."""

    toolkit: DemoToolkit
    out: Path
    corpus: Path
    generalist: Path
    size: DemoSize
    seed: int
    upweighted: str

    def expert_path(self, job: ExpertJob) -> Path:
        """``experts/<prefix><name>-<hash><suffix>``, the hash covering everything that shapes it."""
        shape = {
            "generalist": file_sha256(self.generalist) if self.generalist.is_file() else _folder_digest(self.generalist),
            "chain": job.chain,
            "lora": job.lora,
            "llrd": job.llrd,
            "start": job.start,
            "hyper": job.hyper,
            "snapshots": job.snapshots,
            "size": asdict(self.size),
            "seed": self.seed,
            "toolkit": self.toolkit.fingerprint,
        }
        key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
        return self.out / "experts" / f"{self.toolkit.prefix}{job.name}-{key}{self.toolkit.suffix}"

    def init_of(self, job: ExpertJob) -> Path:
        if job.parent:
            return self.expert_path(job.parent)
        return self.merged_path(job.start) if job.start else self.generalist

    def merged_path(self, name: str) -> Path:
        """Where the merge named ``name`` is written."""
        return self.out / "merged" / f"{self.toolkit.prefix}{slug(name)}{self.toolkit.suffix}"

    def snapshot_dir(self, job: ExpertJob) -> Path | None:
        """Where a single-domain expert's per-epoch snapshots go (for MAST); None for other jobs."""
        return self.out / "snapshots" / self.expert_path(job).name if job.snapshots else None

    def manifest(self, domain: str, split: str) -> Path:
        return self.out / "manifests" / self.toolkit.name / domain / manifest_name(split, self.toolkit.name)


def _folder_digest(folder: Path) -> str:
    """A checkpoint folder's files, by name and content."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps([(str(p.relative_to(folder)), file_sha256(p)) for p in files]).encode()).hexdigest()


def prepare_data(plan: DemoPlan) -> None:
    """The corpus (resumed if interrupted, reused if complete) and every domain's manifests."""
    prepare_synthetic_corpus(plan.corpus, size=plan.size.corpus, seed=plan.seed)
    for domain in DOMAINS:
        dest = plan.manifest(domain.name, "test").parent
        prepare_librispeech(plan.corpus / domain.name, dest, toolkit=plan.toolkit.name)


MACT_RUNS = 4  # MAcT: runs on the focus domain, hyper-parameters from seed 002's ranges
MAST_LAST = 4  # MAST averages the last K per-epoch snapshots
ROUNDS = 3  # iterative AoDE: the 1st round is AoDE itself
# sequential editing (seed 004): theta_t = theta_{t-1} + lambda * trim(theta_hat_t - theta_{t-1})
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
    """Seed 000's Tables VII and VIII and, as the toolkit's :class:`Scenarios` say,
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
    """SMAcT (seed 002, Algorithm 1): each candidate kept only if the soup's WER on the
    focus domain's dev set drops; the trials are logged beside the report."""
    name = f"SMAcT {plan.upweighted}"
    dev = {"manifest": str(plan.manifest(plan.upweighted, "dev")), "log": str(plan.out / "report" / f"{slug(name)}.trials.json")}
    return {
        "method": SOUP_METHOD,
        "base_model": str(plan.generalist),
        "models": candidates,
        "dev": {**dev, **plan.toolkit.dev_options(plan)},
    }


def run_merge(recipe: dict[str, Any]) -> None:
    """One merge of the demo: a greedy soup scores its candidates, the others stream."""
    if recipe["method"] == SOUP_METHOD:
        run_greedy_soup(SoupRecipe.from_mapping(recipe), progress=False)
    else:
        merge(Recipe.from_mapping(recipe), progress=False)


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


def flat_name(domain: str) -> str:
    """The row of ``domain``'s fine-tune without LLRD."""
    return f"FT {domain} without LLRD"


def _target_average(row: dict[str, Any]) -> float:
    """Mean WER over the target domains' test sets."""
    return sum(row["wer"][d] for d in TARGETS) / len(TARGETS)


def _claim(claim: str, holds: bool, numbers: dict[str, Any]) -> dict[str, Any]:
    return {"claim": claim, "holds": holds, "numbers": numbers}


def check_claims(report: dict[str, Any], upweighted: str) -> list[dict[str, Any]]:
    """Seeds 000, 002 and 004's findings, each with whether it holds here and the numbers
    it rests on; a finding is checked when the report has its rows."""
    rows = {m["name"]: m for m in report["models"]}
    forgets = {name: m["forgetting_pct"] or 0.0 for name, m in rows.items()}
    single = {d: rows[f"FT {d}"] for d in TARGETS}
    sequential = [n for n in rows if n.startswith("sequential ") and not n.startswith("sequential editing")]
    merges = [n for n in ("AoDE", "AoDE LoRA", f"AoDE {upweighted} x4", "TIES", "task arithmetic") if n in rows]
    claims = [
        _claim(f"fine-tuning on {d} improves {d} and forgets",
               m["wer"][d] < rows["pretrained"]["wer"][d] and forgets[m["name"]] > 0,
               {"wer_before": rows["pretrained"]["wer"][d], "wer_after": m["wer"][d], "forgetting_pct": forgets[m["name"]]})
        for d, m in single.items()
    ]
    claims += [
        _claim("sequential fine-tuning forgets more than AoDE",
               all(forgets[s] > forgets["AoDE"] for s in sequential), {n: forgets[n] for n in [*sequential, "AoDE"]}),
        _claim("AoDE forgets less than every single-domain fine-tune",
               all(forgets["AoDE"] < forgets[f"FT {d}"] for d in TARGETS),
               {n: forgets[n] for n in ["AoDE", *(f"FT {d}" for d in TARGETS)]}),
        _claim("AoDE with the original forgets least of the merges",
               all(forgets["AoDE with orig"] <= forgets[n] for n in merges),
               {n: forgets[n] for n in ["AoDE with orig", *merges]}),
        _claim(f"up-weighting {upweighted} moves its WER toward its expert's",
               rows[f"AoDE {upweighted} x4"]["wer"][upweighted] < rows["AoDE"]["wer"][upweighted],
               {n: rows[n]["wer"][upweighted] for n in ["AoDE", f"AoDE {upweighted} x4", f"FT {upweighted}"]}),
    ]
    if flat_name(TARGETS[0]) in rows:
        pairs = [(f"FT {d}", flat_name(d)) for d in TARGETS]
        claims.append(_claim("LLRD makes every single-domain fine-tune forget less",
                             all(forgets[llrd] < forgets[flat] for llrd, flat in pairs),
                             {n: forgets[n] for pair in pairs for n in pair}))
    if round_name("AoDE", ROUNDS) in rows:
        claims += iterative_claims(rows, forgets)
    if "sequential editing TA" in rows:
        claims += editing_claims(rows, forgets, sequential[0])
    if f"MAcT {upweighted}" in rows:
        claims += trajectory_claims(rows, upweighted)
    return claims


def iterative_claims(rows: dict[str, Any], forgets: dict[str, float]) -> list[dict[str, Any]]:
    rounds = [round_name("AoDE", k) for k in range(1, ROUNDS + 1)]
    last_round, last_round_orig = round_name("AoDE", ROUNDS), round_name("AoDE with orig", ROUNDS)
    return [
        _claim("iterating AoDE lowers the target domains' average WER round after round",
               all(_target_average(rows[a]) > _target_average(rows[b]) for a, b in zip(rounds, rounds[1:])),
               {n: round(_target_average(rows[n]), 2) for n in rounds}),
        _claim(f"the original in round {ROUNDS}'s average reduces its forgetting",
               forgets[last_round_orig] < forgets[last_round], {n: forgets[n] for n in (last_round, last_round_orig)}),
    ]


def editing_claims(rows: dict[str, Any], forgets: dict[str, float], sequential: str) -> list[dict[str, Any]]:
    editing = [f"sequential editing {label}" for label in EDITS]
    return [
        _claim("sequential editing forgets less than sequential fine-tuning (same order)",
               all(forgets[e] < forgets[sequential] for e in editing), {n: forgets[n] for n in [sequential, *editing]}),
        _claim("TIES editing beats task-arithmetic editing on the target domains",
               _target_average(rows[editing[1]]) < _target_average(rows[editing[0]]),
               {n: round(_target_average(rows[n]), 2) for n in editing}),
    ]


def trajectory_claims(rows: dict[str, Any], upweighted: str) -> list[dict[str, Any]]:
    names = (f"FT {upweighted}", *(f"{m} {upweighted}" for m in ("MAST", "MAcT", "SMAcT")))
    focus = {n: rows[n]["wer"][upweighted] for n in names}
    return [
        _claim(f"MAST, MAcT and SMAcT each beat plain fine-tuning on {upweighted}",
               all(wer < focus[names[0]] for n, wer in focus.items() if n != names[0]), focus),
        _claim(f"SMAcT is at least as good as MAcT on {upweighted}",
               focus[names[3]] <= focus[names[2]], {n: focus[n] for n in names[2:]}),
    ]


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
    out = Path(out or f"outputs/demo/{toolkit.label or toolkit.name}-{size}").resolve()
    if generalist is None and toolkit.prepare_generalist is not None:
        generalist = toolkit.prepare_generalist(out)
    plan = DemoPlan(toolkit, out, Path(corpus or out / "corpus").resolve(),
                    Path(generalist or toolkit.generalist).resolve(), toolkit.sizes[size], seed, upweighted)
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
    })
    summary = {
        "toolkit": toolkit.name,
        "size": size,
        "seconds": round(time.perf_counter() - start, 1),
        "cpus": os.cpu_count(),
        "report": {kind: str(path) for kind, path in files.items()},
        "claims": check_claims(report, upweighted),
    }
    write_text_atomically(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    for claim in summary["claims"]:
        print(f"[{'holds' if claim['holds'] else 'FAILS'}] {claim['claim']}: {claim['numbers']}")
    print(f"demo ({size}) finished in {summary['seconds']:.0f} s; report in {out / 'report'}")
    return summary
