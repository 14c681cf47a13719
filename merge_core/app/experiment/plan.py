"""An experiment's plan: the demo's sizes, one fine-tuning job, what a toolkit gives experiments, and
where a run reads and writes (experts keyed by a hash of all that shapes them)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from merge_core.app.corpus import DOMAINS
from merge_core.app.corpus.domains import ORIGINAL
from merge_core.app.corpus.librispeech import manifest_name
from merge_core.checkpoint.provenance import file_sha256

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

    It starts from the generalist, or from the model named ``start`` (iterative AoDE's
    rounds, sequential editing's steps), found at ``init``; ``hyper`` holds hyper-parameters
    sampled for a MAcT run (:data:`merge_core.recipes.mact.RANGES`), whose best model on the
    domain's dev set is kept.
    """

    chain: tuple[str, ...]
    lora: bool = False
    start: str | None = None
    init: str | None = None  # the checkpoint ``start`` names (its file name hashes all that shapes it)
    hyper: tuple[tuple[str, float], ...] = ()
    llrd: bool = True  # False: one learning rate for every layer (the AoDE paper's LLRD ablation)

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


# characters of row names that file names do without: spaces, the arrow of sequential rows,
# the budget of the search row ("search (<= 1% forgetting)")
_FILE_NAME = {" ": "_", ">": "-", "<=": "le", "%": "pct", "(": "", ")": ""}


def slug(name: str) -> str:
    """A row name as a file-name part.

    >>> slug("AoDE with orig r2"), slug("search (<= 1% forgetting)")
    ('AoDE_with_orig_r2', 'search_le_1pct_forgetting')
    """
    for old, new in _FILE_NAME.items():
        name = name.replace(old, new)
    return name


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
    experiment: Path  # the demo's experiment file (configs/experiments/demo_<name>.yaml): what it runs
    sizes: dict[str, DemoSize] = field(default_factory=lambda: DEMO_SIZES)
    # out folder -> the generalist checkpoint, written there when it is not shipped as one
    prepare_generalist: Callable[[Path], Path] | None = None
    label: str = ""  # of the default output folder, outputs/demo/<label or name>-<size>
    # tensors every merge copies from its base_model: those no expert trains (a frozen encoder)
    merge_exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class DemoPlan:
    """Where a run reads and writes, and what shapes its experts.

    ``manifests`` maps a domain to its splits' manifests (an experiment file's ``domains`` and
    ``original``); without it they are the demo's, under ``out/manifests``. ``finetune`` holds
    an experiment's fine-tuning ``config`` (a file replacing the toolkit's) and ``overrides``.
    """

    toolkit: DemoToolkit
    out: Path
    corpus: Path
    generalist: Path
    size: DemoSize
    seed: int
    upweighted: str
    manifests: Mapping[str, Mapping[str, str]] | None = None
    finetune: Mapping[str, Any] = field(default_factory=dict)

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
            "data": {d: file_sha256(self.manifest(d, "train")) for d in job.chain},  # its training manifests
        }
        if job.init:
            shape["init"] = Path(job.init).name
        if self.finetune:
            shape["finetune"] = {**self.finetune, "config": self.finetune_config_text()}
        key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
        return self.out / "experts" / f"{self.toolkit.prefix}{job.name}-{key}{self.toolkit.suffix}"

    def finetune_config_text(self) -> str | None:
        config = self.finetune.get("config")
        return Path(config).read_text(encoding="utf-8") if config else None

    def init_of(self, job: ExpertJob) -> Path:
        if job.parent:
            return self.expert_path(job.parent)
        return Path(job.init) if job.init else self.generalist

    def merged_path(self, name: str, shape: Any) -> Path:
        """Where the merge named ``name`` is written: ``merged/<prefix><name>-<hash><suffix>``,
        the hash covering its ``shape`` (its recipe, whose inputs' names hash what shapes them)."""
        key = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self.out / "merged" / f"{self.toolkit.prefix}{slug(name)}-{key}{self.toolkit.suffix}"

    def snapshot_dir(self, job: ExpertJob) -> Path | None:
        """Where a single-domain expert's per-epoch snapshots go (for MAST); None for other jobs."""
        return self.out / "snapshots" / self.expert_path(job).name if job.snapshots else None

    def manifest(self, domain: str, split: str) -> Path:
        """A split's manifest; the original domain's ``train`` and ``dev`` are LibriSpeech's
        ``train-clean-100`` and ``dev-clean`` (so an expert of the original domain trains as any other)."""
        if self.manifests is not None:
            return Path(self.manifests[domain][split])
        if domain == ORIGINAL:
            split = {"train": "train-clean-100", "dev": "dev-clean"}.get(split, split)
        return self.out / "manifests" / self.toolkit.name / domain / manifest_name(split, self.toolkit.name)


def _folder_digest(folder: Path) -> str:
    """A checkpoint folder's files, by name and content."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps([(str(p.relative_to(folder)), file_sha256(p)) for p in files]).encode()).hexdigest()
