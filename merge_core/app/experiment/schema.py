"""An experiment file: what ``asr-merge run EXPERIMENT.yaml [key=value ...]`` reads.

.. code-block:: yaml

    name: parakeet-five-domains           # default: the file's name
    toolkit: nemo                         # or speechbrain
    generalist: models/parakeet-ctc-1.1b.nemo   # a .nemo, a CKPT+ folder, or a demo name (whisper-tiny.en)
    storage: /shared/experiments/parakeet # every artifact, keyed by content; every worker must see it
    seed: 0
    data_root: null                       # SpeechBrain: $data_root of the CSV manifests
    domains:                              # name -> the toolkit's own manifests
      accented: {train: .../train.json, dev: .../dev.json, test: .../test.json}
    original:                             # the generalist's own sets: forgetting is measured on them
      test_clean: .../test_clean.json
      test_other: .../test_other.json
      dev_clean: .../dev_clean.json       # optional: the search's forgetting on dev
    finetune:
      config: null                        # the toolkit's fine-tuning config (default: the shipped one)
      overrides: {}                       # NeMo: dotted keys (trainer.devices: 8); SpeechBrain: hparams
      epochs: 8
      max_steps: -1
      batch_size: 16
      lr: 1.0e-3                          # the top layer's peak rate (LLRD scales the others)
      lora_lr: 3.0e-3
      train_utterances: null              # the first N of each training set (null: all)
      resources: {cpus: 1, gpus: 0}       # per expert; gpus > 1: the toolkit's own DDP on one node
    procedures:                           # any of merge_core.app.experiment.procedures, in any order
      - experts: {domains: all}
      - merge: {name: AoDE, method: average}
    run_optional: false                   # procedures marked optional: true run only when this is true
    vars: {}                              # free values the file interpolates: ${vars.manifests}/noisy/train.json
    evaluate:
      forgetting_sets: [test_clean, test_other]
      resources: {cpus: 1, gpus: 0}
      claims: false                       # the AoDE demo's claims checked against the numbers
      upweighted: null                    # the claims' up-weighted domain
      note: null
    executor: local                       # or ray
    local: {jobs: null}                   # parallel jobs (default: CPU cores / cpus per job)
    ray: {address: null, max_retries: 3}  # null: a Ray started on this machine; auto or ray://host:port
                                          # also num_cpus, num_gpus (of a local Ray), runtime_env

Relative paths are relative to the current directory, as a recipe's. Any key can be
overridden on the command line (``finetune.epochs=4``, ``executor=ray``), OmegaConf
interpolations (``${storage}``) are resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from merge_core.app.experiment.procedures import PROCEDURES
from merge_core.errors import RecipeError
from merge_core.recipes.config import load_yaml_config

SPLITS = ("train", "dev", "test")
EXECUTORS = ("local", "ray")
LOCAL_OPTIONS = ("jobs",)
RAY_OPTIONS = ("address", "max_retries", "num_cpus", "num_gpus", "runtime_env")


@dataclass(frozen=True)
class Resources:
    """What one job holds: CPU cores (also its torch threads) and GPUs."""

    cpus: int = 1
    gpus: int = 0


@dataclass(frozen=True)
class Finetune:
    config: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 8
    max_steps: int = -1
    batch_size: int = 16
    lr: float = 1e-3
    lora_lr: float = 3e-3
    train_utterances: int | None = None
    resources: Resources = Resources()


@dataclass(frozen=True)
class Evaluate:
    forgetting_sets: tuple[str, ...] = ("test_clean", "test_other")
    resources: Resources = Resources()
    claims: bool = False
    upweighted: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Experiment:
    """An experiment file, checked (every key known and of its type, every manifest present)."""

    name: str
    toolkit: str
    generalist: str | None
    storage: Path
    domains: Mapping[str, Mapping[str, str]]
    original: Mapping[str, str]
    procedures: tuple[tuple[str, str, Mapping[str, Any]], ...]  # (key in the file, procedure, parameters)
    seed: int = 0
    data_root: str | None = None
    finetune: Finetune = Finetune()
    evaluate: Evaluate = Evaluate()
    executor: str = "local"
    local: Mapping[str, Any] = field(default_factory=dict)
    ray: Mapping[str, Any] = field(default_factory=dict)
    run_optional: bool = False
    vars: Mapping[str, Any] = field(default_factory=dict)  # free values for the file's ${vars.x} interpolations


def _section(cls: type, raw: Any, key: str) -> Any:
    """``raw`` as dataclass ``cls``, unknown keys refused by name."""
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise RecipeError(f"experiment key '{key}' must be a mapping, got {raw!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RecipeError(f"unknown experiment key(s) {[f'{key}.{u}' for u in unknown]}; known: {sorted(known)}")
    values = dict(raw)
    if "resources" in values:
        values["resources"] = _section(Resources, values["resources"], f"{key}.resources")
    if "forgetting_sets" in values:
        values["forgetting_sets"] = tuple(values["forgetting_sets"])
    return cls(**values)


def _procedures(raw: Any, run_optional: bool) -> tuple[tuple[str, str, Mapping[str, Any]], ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise RecipeError(f"experiment key 'procedures' must be a non-empty list, got {raw!r}")
    chosen = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping) or len(entry) != 1:
            raise RecipeError(f"procedures[{i}] must be one 'name: parameters' entry, got {entry!r}")
        (name, params), = entry.items()
        key = f"procedures[{i}].{name}"
        if name not in PROCEDURES:
            raise RecipeError(f"{key}: unknown procedure '{name}'; known: {sorted(PROCEDURES)}")
        params = dict(params or {})
        if params.pop("optional", False) and not run_optional:
            continue
        chosen.append((key, str(name), params))
    return tuple(chosen)


def _manifests(raw: Any, key: str, splits: Sequence[str] | None) -> dict[str, Any]:
    if not isinstance(raw, Mapping) or not raw:
        raise RecipeError(f"experiment key '{key}' must map names to manifests, got {raw!r}")
    if splits is None:
        return {str(k): str(v) for k, v in raw.items()}
    out = {}
    for name, sets in raw.items():
        missing = [s for s in splits if not isinstance(sets, Mapping) or s not in sets]
        if missing:
            raise RecipeError(f"{key}.{name}: needs manifests for {list(splits)}, missing {missing}")
        out[str(name)] = {s: str(sets[s]) for s in splits}
    return out


TOP_LEVEL = {f.name for f in fields(Experiment)}


def parse_experiment(raw: Mapping[str, Any], name: str = "experiment") -> Experiment:
    """An experiment from a mapping (an experiment file's content, overrides applied)."""
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise RecipeError(f"unknown experiment key(s) {unknown}; known: {sorted(TOP_LEVEL)}")
    for required in ("toolkit", "storage", "domains", "original", "procedures"):
        if raw.get(required) in (None, ""):
            raise RecipeError(f"experiment key '{required}' is required")
    executor = raw.get("executor", "local")
    if executor not in EXECUTORS:
        raise RecipeError(f"experiment key 'executor' must be one of {list(EXECUTORS)}, got {executor!r}")
    run_optional = bool(raw.get("run_optional", False))
    for section, known in (("local", LOCAL_OPTIONS), ("ray", RAY_OPTIONS)):
        unknown = sorted(set(raw.get(section) or {}) - set(known))
        if unknown:
            raise RecipeError(f"unknown experiment key(s) {[f'{section}.{k}' for k in unknown]}; known: {list(known)}")
    return Experiment(
        name=str(raw.get("name") or name),
        toolkit=str(raw["toolkit"]),
        generalist=None if raw.get("generalist") is None else str(raw["generalist"]),
        storage=Path(str(raw["storage"])).resolve(),
        domains=_manifests(raw["domains"], "domains", SPLITS),
        original=_manifests(raw["original"], "original", None),
        procedures=_procedures(raw["procedures"], run_optional),
        seed=int(raw.get("seed", 0)),
        data_root=None if raw.get("data_root") is None else str(raw["data_root"]),
        finetune=_section(Finetune, raw.get("finetune"), "finetune"),
        evaluate=_section(Evaluate, raw.get("evaluate"), "evaluate"),
        executor=executor,
        local=dict(raw.get("local") or {}),
        ray=dict(raw.get("ray") or {}),
        run_optional=run_optional,
        vars=dict(raw.get("vars") or {}),
    )


def load_experiment(path: str | Path, overrides: Sequence[str] = (), values: Mapping[str, Any] | None = None) -> Experiment:
    """Read an experiment file with ``key=value`` overrides (and ``values``: dotted keys set as
    they are, not parsed); every key checked, nothing run."""
    config = load_yaml_config(path, overrides, "experiment file")
    for key, value in (values or {}).items():
        OmegaConf.update(config, key, value, merge=True)
    try:
        raw = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as e:
        raise RecipeError(f"{path}: {e}") from None
    return parse_experiment(raw, Path(path).stem)


def missing_files(experiment: Experiment) -> list[str]:
    """Every manifest (and the generalist, when it is a path) that is not there, by its key."""
    wanted = {f"domains.{d}.{s}": p for d, sets in experiment.domains.items() for s, p in sets.items()}
    wanted.update({f"original.{k}": p for k, p in experiment.original.items()})
    if experiment.finetune.config:
        wanted["finetune.config"] = experiment.finetune.config
    return [f"{key}: {path}" for key, path in wanted.items() if not Path(path).exists()]
