"""The AoDE demo, toolkit-free: experts fine-tuned from one generalist forget; their average does not.

``asr-merge demo`` runs, through the code paths a user runs on LibriSpeech:

1. the synthetic corpus (:func:`merge_core.corpus.prepare_synthetic_corpus`) and the
   toolkit's manifests of every domain;
2. one expert per target domain, fine-tuned from the toolkit's shipped generalist with
   the paper's LLRD + slanted triangular schedule, the same with LoRA (folded back on
   export), and sequential fine-tuning through all domains in two orders (Scenario 2);
3. the merges of seed 000's Tables VII and VIII by :func:`merge_core.engine.merge`;
4. WER on every domain's test set and forgetting on ``test-clean`` + ``test-other``:
   ``report.{json,md,png}``, and ``demo.json`` with the paper's claims checked against
   the numbers.

A toolkit adapter supplies a :class:`DemoToolkit`: its generalist, how it fine-tunes one
expert, and its evaluation (``nemo_merge.demo.NEMO``, ``speechbrain_merge.demo.SPEECHBRAIN``).

Experts are keyed by a hash of everything that shapes them (generalist, domains in
order, LoRA, size settings, seed, fine-tuning config), so a rerun reuses finished ones;
independent experts train in parallel processes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from merge_core.corpus import DOMAINS, prepare_librispeech, prepare_synthetic_corpus
from merge_core.corpus.domains import ORIGINAL
from merge_core.corpus.files import write_text_atomically
from merge_core.corpus.librispeech import manifest_name
from merge_core.engine import merge
from merge_core.provenance import file_sha256
from merge_core.recipe import Recipe

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


DEMO_SIZES = {
    "smoke": DemoSize("smoke", epochs=1, max_steps=2, batch_size=4, lr=1e-3, lora_lr=3e-3),
    "default": DemoSize("default", epochs=8, max_steps=-1, batch_size=16, lr=1e-3, lora_lr=3e-3),
    "large": DemoSize("large", epochs=10, max_steps=-1, batch_size=32, lr=5e-4, lora_lr=2e-3),
}


@dataclass(frozen=True)
class ExpertJob:
    """A model fine-tuned from the generalist on ``chain``'s domains, one after another."""

    chain: tuple[str, ...]
    lora: bool = False

    @property
    def name(self) -> str:
        return ("lora-" if self.lora else "ft-") + "-".join(self.chain)

    @property
    def parent(self) -> "ExpertJob | None":
        """The job whose output this one starts from (``None``: the generalist)."""
        return ExpertJob(self.chain[:-1], self.lora) if len(self.chain) > 1 else None


@dataclass(frozen=True)
class DemoToolkit:
    """What a toolkit adapter gives the demo. Its functions are module-level, so that
    expert processes can receive them."""

    name: str  # "nemo" or "speechbrain": also the manifests' kind
    generalist: Path  # the shipped generalist checkpoint
    prefix: str  # of a checkpoint's file or folder name: "CKPT+" for SpeechBrain
    suffix: str  # ".nemo"
    train_expert: Callable[["DemoPlan", ExpertJob, int], Path]  # (plan, job, torch threads) -> checkpoint
    evaluate: Callable[["DemoPlan", dict[str, Any]], tuple[dict[str, Any], dict[str, Path]]]  # config -> report, files
    fingerprint: dict[str, Any]  # what else shapes an expert: fine-tuning config, LoRA settings


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
            "size": asdict(self.size),
            "seed": self.seed,
            "toolkit": self.toolkit.fingerprint,
        }
        key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
        return self.out / "experts" / f"{self.toolkit.prefix}{job.name}-{key}{self.toolkit.suffix}"

    def init_of(self, job: ExpertJob) -> Path:
        return self.expert_path(job.parent) if job.parent else self.generalist

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


def expert_jobs() -> list[list[ExpertJob]]:
    """Jobs in stages, each stage's jobs independent: single-domain and LoRA experts, then
    each step of sequential fine-tuning in the domains' order and its reverse (their first
    steps are single-domain experts, so trained once)."""
    orders = (TARGETS, TARGETS[::-1])
    stages = [[ExpertJob((d,)) for d in TARGETS] + [ExpertJob((d,), lora=True) for d in TARGETS]]
    stages += [[ExpertJob(order[:k]) for order in orders] for k in range(2, len(TARGETS) + 1)]
    return stages


def train_experts(plan: DemoPlan, jobs: int) -> None:
    """Every expert not already on disk, ``jobs`` processes at a time."""
    stages = expert_jobs()
    todo = [[j for j in stage if not plan.expert_path(j).exists()] for stage in stages]
    total = sum(len(stage) for stage in todo)
    print(f"experts: {total} to train, {sum(map(len, stages)) - total} reused")
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    context = multiprocessing.get_context("spawn")  # a forked toolkit with live torch threads can deadlock
    with tqdm(total=total, desc="experts", unit="model") as bar:
        for stage in filter(None, todo):
            with ProcessPoolExecutor(max_workers=min(jobs, len(stage)), mp_context=context) as pool:
                trainer = plan.toolkit.train_expert
                for _ in pool.map(trainer, [plan] * len(stage), stage, [threads] * len(stage)):
                    bar.update()


def merge_recipes(plan: DemoPlan) -> dict[str, dict[str, Any]]:
    """Row name -> merge recipe, for seed 000's Tables VII and VIII."""
    experts = [str(plan.expert_path(ExpertJob((d,)))) for d in TARGETS]
    lora = [str(plan.expert_path(ExpertJob((d,), lora=True))) for d in TARGETS]
    base = str(plan.generalist)
    upweighted = [{"model": m, "weight": 4.0 if d == plan.upweighted else 1.0} for d, m in zip(TARGETS, experts)]
    recipes = {
        "AoDE": {"method": "average", "models": experts},
        "AoDE with orig": {"method": "average", "models": experts, "include_base": True},
        "AoDE LoRA": {"method": "average", "models": lora},
        f"AoDE {plan.upweighted} x4": {"method": "average", "models": upweighted},
        "original x4": {"method": "average", "models": experts, "include_base": True, "base_weight": 4.0},
        "TIES": {"method": "ties", "models": experts, "parameters": {"density": 0.2, "lambda": 1.0}},
        "task arithmetic": {"method": "task_arithmetic", "models": experts, "parameters": {"lambda": 0.4}},
    }
    for i, (name, recipe) in enumerate(recipes.items()):
        file_name = f"{plan.toolkit.prefix}{i}-{name.replace(' ', '_')}{plan.toolkit.suffix}"
        recipe.update(base_model=base, output=str(plan.out / "merged" / file_name))
    return recipes


def evaluation_rows(plan: DemoPlan, merged: dict[str, str]) -> list[dict[str, str]]:
    """The report's rows in Table VII's order: pretrained, fine-tunes, sequential, merges."""
    rows = [{"name": "pretrained", "model": str(plan.generalist)}]
    rows += [{"name": f"FT {d}", "model": str(plan.expert_path(ExpertJob((d,))))} for d in TARGETS]
    for order in (TARGETS, TARGETS[::-1]):
        rows.append({"name": "sequential " + ">".join(order), "model": str(plan.expert_path(ExpertJob(order)))})
    rows += [{"name": name, "model": path} for name, path in merged.items()]
    return rows


def check_claims(report: dict[str, Any], upweighted: str) -> list[dict[str, Any]]:
    """Seed 000's findings, each with whether it holds here and the numbers it rests on."""
    rows = {m["name"]: m for m in report["models"]}
    forgets = {name: m["forgetting_pct"] for name, m in rows.items()}
    single = {d: rows[f"FT {d}"] for d in TARGETS}
    sequential = [n for n in rows if n.startswith("sequential ")]
    merges = ["AoDE", "AoDE LoRA", f"AoDE {upweighted} x4", "TIES", "task arithmetic"]
    claims = [
        {
            "claim": f"fine-tuning on {d} improves {d} and forgets",
            "holds": m["wer"][d] < rows["pretrained"]["wer"][d] and (forgets[m["name"]] or 0) > 0,
            "numbers": {"wer_before": rows["pretrained"]["wer"][d], "wer_after": m["wer"][d],
                        "forgetting_pct": forgets[m["name"]]},
        }
        for d, m in single.items()
    ]
    claims.append({
        "claim": "sequential fine-tuning forgets more than AoDE",
        "holds": all((forgets[s] or 0) > (forgets["AoDE"] or 0) for s in sequential),
        "numbers": {n: forgets[n] for n in [*sequential, "AoDE"]},
    })
    claims.append({
        "claim": "AoDE with the original forgets least of the merges",
        "holds": all((forgets["AoDE with orig"] or 0) <= (forgets[n] or 0) for n in merges),
        "numbers": {n: forgets[n] for n in ["AoDE with orig", *merges]},
    })
    claims.append({
        "claim": f"up-weighting {upweighted} moves its WER toward its expert's",
        "holds": rows[f"AoDE {upweighted} x4"]["wer"][upweighted] < rows["AoDE"]["wer"][upweighted],
        "numbers": {n: rows[n]["wer"][upweighted] for n in ["AoDE", f"AoDE {upweighted} x4", f"FT {upweighted}"]},
    })
    return claims


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
    out = Path(out or f"outputs/demo/{toolkit.name}-{size}").resolve()
    plan = DemoPlan(toolkit, out, Path(corpus or out / "corpus").resolve(),
                    Path(generalist or toolkit.generalist).resolve(), DEMO_SIZES[size], seed, upweighted)
    prepare_data(plan)
    train_experts(plan, jobs or max(1, os.cpu_count() or 1))
    merged = {}
    for name, raw in tqdm(merge_recipes(plan).items(), desc="merges", unit="model"):
        merged[name] = str(merge(Recipe.from_mapping(raw), progress=False).output)
    manifests = {s.replace("-", "_"): plan.manifest(ORIGINAL, s) for s in ("test-clean", "test-other")}
    manifests.update({d: plan.manifest(d, "test") for d in TARGETS})
    report, files = toolkit.evaluate(plan, {
        "models": evaluation_rows(plan, merged),
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
