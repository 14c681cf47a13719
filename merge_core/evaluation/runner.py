"""The forgetting evaluation, toolkit-free: config, cache, scoring and report.

A toolkit adapter supplies a :class:`Backend` (how to read its manifests, identify
a model's weights, and transcribe with the model's own inference path); this module
does the rest the same way for both toolkits. The config (YAML or Hydra):

.. code-block:: yaml

    models:                                  # rows of the report, in order
      - {name: generalist, model: generalist.nemo}
      - {name: aode, model: merged.nemo}
      - {name: parakeet, pretrained_name: nvidia/parakeet-ctc-1.1b}
    reference_model: generalist              # default: the first model
    manifests: {test_clean: ls/test_clean.json, test_other: ls/test_other.json, noise: noise/test.json}
    forgetting_sets: [test_clean, test_other]
    normalization: {lowercase: true, strip_punctuation: true, english: false}
    batch_size: 16
    max_utterances: null                     # evaluate the first N of each set (dev subsets)
    max_duration: 300                        # refuse audio longer than this (s), as NeMo's datasets' key; null: no bound
    output_dir: outputs/eval                 # report.json, report.md, report.png; eval.log (the toolkit's log);
                                             # transcripts/<model>/<set>.json (NeMo) or .csv (SpeechBrain)
    cache: true                              # reuse transcripts by (weights, manifest, decoding)
    cache_dir: null                          # default ~/.cache/asr-merge/eval
    bootstrap: {resamples: 1000, confidence: 0.95, seed: 0}   # the intervals (merge_core.evaluation.bootstrap)
    note: null                               # a warning printed with the report (the demo's smoke size sets one)
"""

from __future__ import annotations

import abc
import contextlib
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from merge_core.atomic import write_atomically
from merge_core.errors import EvaluationError
from merge_core.evaluation.bootstrap import BootstrapSettings
from merge_core.evaluation.cache import EvalCache, manifest_digest
from merge_core.evaluation.manifests import DEFAULT_MAX_DURATION
from merge_core.evaluation.report import (
    DEFAULT_FORGETTING_SETS,
    ModelSource,
    build_report,
    render_markdown,
    write_report,
)
from merge_core.evaluation.text import TextNormalization
from merge_core.evaluation.toolkit_log import toolkit_output_to
from merge_core.evaluation.wer import WerStats, score_utterances
from merge_core.evaluation.manifests import Utterance, check_audio


LOG_NAME = "eval.log"  # the toolkit's log and warnings, beside the report
TRANSCRIPTS = "transcripts"  # transcripts/<model>/<set><suffix>, beside the report


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a local checkpoint (``model``) or a toolkit hub name."""

    name: str
    model: str | None = None
    pretrained_name: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    models: tuple[ModelSpec, ...]
    manifests: Mapping[str, str]
    reference_model: str
    forgetting_sets: tuple[str, ...] = DEFAULT_FORGETTING_SETS
    normalization: TextNormalization = field(default_factory=TextNormalization)
    batch_size: int = 16
    num_workers: int = 0
    max_utterances: int | None = None
    device: str = "auto"
    decoding: Mapping[str, Any] | None = None
    output_dir: str = "outputs/eval"
    cache: bool = True
    cache_dir: str | None = None
    toolkit: str = "nemo"
    max_duration: float | None = DEFAULT_MAX_DURATION
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    note: str | None = None

    def resolved_device(self) -> str:
        """``device``, with ``auto`` meaning CUDA when torch sees a GPU."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | DictConfig) -> "EvalConfig":
        if isinstance(raw, DictConfig):
            raw = OmegaConf.to_container(raw, resolve=True)
        if not isinstance(raw, Mapping):
            raise EvaluationError(f"an evaluation config must be a mapping of keys, got {type(raw).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(map(str, set(raw) - known))
        if unknown:
            raise EvaluationError(f"unknown evaluation key(s) {unknown}; known keys: {sorted(known)}")
        listed = raw.get("models") or []
        if not isinstance(listed, (list, tuple)):
            raise EvaluationError(f"evaluation key 'models' must be a list of models, got {listed!r}")
        models = tuple(_model_spec(i, m) for i, m in enumerate(listed))
        if not models:
            raise EvaluationError("evaluation key 'models' must list at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise EvaluationError(f"model names must be unique, got {names}")
        manifests = raw.get("manifests") or {}
        named = isinstance(manifests, Mapping) and all(isinstance(k, str) and _is_path(v) for k, v in manifests.items())
        if not named:
            raise EvaluationError(
                f"evaluation key 'manifests' must map test set names to manifest paths, got {manifests!r}"
            )
        if not manifests:
            raise EvaluationError("evaluation key 'manifests' must name at least one test set")
        forgetting = raw.get("forgetting_sets") or DEFAULT_FORGETTING_SETS
        if not isinstance(forgetting, (list, tuple)) or not all(isinstance(s, str) for s in forgetting):
            raise EvaluationError(
                f"evaluation key 'forgetting_sets' must be a list of test set names, got {forgetting!r}"
            )
        absent = [s for s in forgetting if s not in manifests]
        if absent:
            raise EvaluationError(f"forgetting set(s) {absent} have no entry in 'manifests' ({sorted(manifests)})")
        options: dict[str, Any] = {}
        reference = raw.get("reference_model") or names[0]
        if reference not in names:
            raise EvaluationError(f"reference_model {reference!r} is not one of the models {names}")
        if "max_duration" in raw:
            options["max_duration"] = _max_duration(raw["max_duration"])
        for key, (what, valid) in _OPTIONS.items():
            if raw.get(key) is not None and not valid(raw[key]):
                raise EvaluationError(f"evaluation key {key!r} must be {what}, got {raw[key]!r}")
        options |= {k: raw[k] for k in _OPTIONS if raw.get(k) is not None}
        for key in ("normalization", "bootstrap"):
            if raw.get(key) is not None and not isinstance(raw[key], Mapping):
                raise EvaluationError(f"evaluation key {key!r} must be a mapping, got {raw[key]!r}")
        return cls(
            models=models,
            manifests=dict(manifests),
            reference_model=reference,
            forgetting_sets=tuple(forgetting),
            normalization=TextNormalization.from_mapping(raw.get("normalization")),
            bootstrap=BootstrapSettings.from_mapping(raw.get("bootstrap")),
            **options,
        )


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, PathLike)) and str(value) != ""


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# the evaluation's options: what each must be (for the message) and its check
_OPTIONS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "batch_size": ("an integer >= 1", lambda v: _is_count(v, 1)),
    "num_workers": ("an integer >= 0", lambda v: _is_count(v, 0)),
    "max_utterances": ("an integer >= 1, or null for every utterance", lambda v: _is_count(v, 1)),
    "device": ("a device name such as auto, cpu or cuda", lambda v: isinstance(v, str) and v != ""),
    "decoding": ("a mapping of decoding settings", lambda v: isinstance(v, Mapping)),
    "output_dir": ("a folder path", _is_path),
    "cache": ("true or false", lambda v: isinstance(v, bool)),
    "cache_dir": ("a folder path, or null for the default", _is_path),
    "toolkit": ("a toolkit name such as nemo or speechbrain", lambda v: isinstance(v, str) and v != ""),
    "note": ("a string, or null for none", lambda v: isinstance(v, str)),
}


def _max_duration(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise EvaluationError(f"evaluation key 'max_duration' must be a positive number of seconds or null, got {value!r}")
    return float(value)


def _model_spec(i: int, raw: Any) -> ModelSpec:
    if isinstance(raw, str):
        raw = {"model": raw}
    if not isinstance(raw, Mapping) or bool(raw.get("model")) == bool(raw.get("pretrained_name")):
        raise EvaluationError(f"models[{i}] needs exactly one of 'model' (a path) or 'pretrained_name', got {raw!r}")
    extra = sorted(map(str, set(raw) - {"name", "model", "pretrained_name"}))
    if extra:
        raise EvaluationError(f"models[{i}] has unknown key(s) {extra}")
    wrong = [k for k in ("model", "pretrained_name") if raw.get(k) and not _is_path(raw[k])]
    if wrong or isinstance(raw.get("name"), (bool, Mapping, list, tuple)):
        key = wrong[0] if wrong else "name"
        raise EvaluationError(f"models[{i}].{key} must be a string, got {raw[key]!r}")
    source = raw.get("model") or raw["pretrained_name"]
    name = raw.get("name") or Path(str(source)).stem
    return ModelSpec(name=str(name), model=raw.get("model"), pretrained_name=raw.get("pretrained_name"))


class Backend(abc.ABC):
    """What a toolkit adapter provides to the evaluation."""

    toolkit: str
    transcript_suffix: str  # of a transcripts file, as the toolkit's manifests: ".json", ".csv"

    @abc.abstractmethod
    def read_manifest(self, path: Path) -> list[Utterance]:
        """The toolkit's own manifest format, resolved to absolute audio paths."""

    @abc.abstractmethod
    def weights_digest(self, spec: ModelSpec) -> str:
        """A string that changes whenever the model's weights or config do."""

    @abc.abstractmethod
    def decoding_settings(self, config: EvalConfig) -> dict[str, Any]:
        """Everything besides weights and audio that changes the transcripts."""

    @abc.abstractmethod
    def transcribe(self, spec: ModelSpec, utterances: list[Utterance], config: EvalConfig) -> list[str]:
        """One hypothesis per utterance, through the model's own inference path."""

    @abc.abstractmethod
    def format_transcripts(self, manifest: Path, hypotheses: Sequence[str], scores: Sequence[WerStats]) -> str:
        """One set's transcripts file in the toolkit's own format: the first ``len(hypotheses)``
        entries of ``manifest`` (as :meth:`read_manifest` reads them) with their hypotheses and
        per-utterance counts (:func:`~merge_core.evaluation.wer.score_utterances`)."""

    def release(self, spec: ModelSpec) -> None:
        """Free the model once every set is transcribed."""


def load_sets(backend: Backend, config: EvalConfig) -> dict[str, list[Utterance]]:
    """Read and check every manifest before any model is loaded, so bad input fails fast."""
    sets = {}
    for name, path in config.manifests.items():
        utterances = backend.read_manifest(Path(path))
        if config.max_utterances is not None:
            utterances = utterances[: config.max_utterances]
        check_audio(utterances, path, config.max_duration)
        sets[name] = utterances
    return sets


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation produced: the report, and per model and set the hypotheses and
    their per-utterance counts, in manifest order."""

    report: dict[str, Any]
    hypotheses: dict[str, dict[str, list[str]]]
    scores: dict[str, dict[str, list[WerStats]]]


def safe_names(names: Sequence[str]) -> dict[str, str]:
    """Each name as a distinct file or folder name: characters other than letters,
    digits, ``.``, ``-`` and ``_`` become ``_``, no leading dot, and a name met again
    after that (ignoring case, for case-insensitive file systems) gets ``-2``, ``-3``...

    >>> safe_names(["AoDE x4", "AoDE_x4", "search (<= 1% forgetting)", ".."])
    {'AoDE x4': 'AoDE_x4', 'AoDE_x4': 'AoDE_x4-2', 'search (<= 1% forgetting)': 'search_1_forgetting_', '..': '_'}
    """
    safe: dict[str, str] = {}
    for name in names:
        base = re.sub(r"[^\w.-]+", "_", name).lstrip(".") or "_"
        candidate, repeat = base, 1
        while candidate.casefold() in {taken.casefold() for taken in safe.values()}:
            repeat += 1
            candidate = f"{base}-{repeat}"
        safe[name] = candidate
    return safe


def transcript_paths(models: Sequence[str], sets: Sequence[str], suffix: str) -> dict[str, dict[str, str]]:
    """model -> set -> ``transcripts/<model>/<set><suffix>``, relative to the report's folder."""
    folders, files = safe_names(models), safe_names(sets)
    return {m: {s: f"{TRANSCRIPTS}/{folders[m]}/{files[s]}{suffix}" for s in sets} for m in models}


def evaluate_models(
    backend: Backend, config: EvalConfig, progress: bool = True, toolkit_log: Path | None = None
) -> Evaluation:
    """Transcribe every (model, set) pair not already cached, score each utterance, and
    build the report (with its intervals, each row's checkpoint, weights digest and
    transcript paths). With ``toolkit_log``, what the toolkit prints, logs and warns while
    it restores and decodes goes to that file (appended) instead of the terminal."""
    sets = load_sets(backend, config)
    cache = EvalCache(config.cache_dir) if config.cache else None
    decoding = {**backend.decoding_settings(config), "max_utterances": config.max_utterances}
    digests = {name: manifest_digest(path) for name, path in config.manifests.items()}
    paths = transcript_paths([m.name for m in config.models], list(sets), backend.transcript_suffix)
    hypotheses: dict[str, dict[str, list[str]]] = {}
    scores: dict[str, dict[str, list[WerStats]]] = {}
    sources: dict[str, ModelSource] = {}
    pairs = tqdm(total=len(config.models) * len(sets), desc="evaluate", unit="set", disable=not progress)
    for spec in config.models:
        weights = backend.weights_digest(spec)
        sources[spec.name] = ModelSource(spec.model or spec.pretrained_name, weights, paths[spec.name])
        hypotheses[spec.name], scores[spec.name] = {}, {}
        for set_name, utterances in sets.items():
            key = (weights, digests[set_name], decoding)
            cached = cache.get(key) if cache else None
            if cached:
                decoded = cached["hypotheses"]
            else:
                with toolkit_output_to(toolkit_log) if toolkit_log else contextlib.nullcontext():
                    decoded = backend.transcribe(spec, utterances, config)
            if cache and not cached:
                cache.put(key, {"hypotheses": decoded, "model": spec.name, "set": set_name})
            references = [u.text for u in utterances]
            hypotheses[spec.name][set_name] = decoded
            scores[spec.name][set_name] = score_utterances(references, decoded, config.normalization, name=set_name)
            pairs.update()
        backend.release(spec)
    pairs.close()
    report = build_report(
        scores,
        config.reference_model,
        config.forgetting_sets,
        sources=sources,
        normalization=config.normalization,
        bootstrap=config.bootstrap,
        note=config.note,
    )
    return Evaluation(report, hypotheses, scores)


def write_transcripts(backend: Backend, config: EvalConfig, evaluation: Evaluation) -> Path:
    """Every row's transcripts of every set, at the paths its report row names, in the
    toolkit's format; the ``transcripts`` folder is replaced whole, atomically (a reader
    sees the previous evaluation's or this one's, never a mix). Returns the folder."""
    out = Path(config.output_dir)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        for row in evaluation.report["models"]:
            for set_name, relative in row["transcripts"].items():
                path = tmp / Path(relative).relative_to(TRANSCRIPTS)
                path.parent.mkdir(exist_ok=True)
                text = backend.format_transcripts(
                    Path(config.manifests[set_name]),
                    evaluation.hypotheses[row["name"]][set_name],
                    evaluation.scores[row["name"]][set_name],
                )
                path.write_text(text, encoding="utf-8")

    write_atomically(out / TRANSCRIPTS, write)
    return out / TRANSCRIPTS


def run_evaluation(backend: Backend, config: EvalConfig, progress: bool = True) -> tuple[dict[str, Any], dict[str, Path]]:
    """Evaluate, write the transcripts and report.json / report.md / report.png, print the
    table. The toolkit's own output goes to ``<output_dir>/eval.log``, published with the
    report; if the evaluation fails, nothing is written and that output is shown on stderr
    instead."""
    with tempfile.TemporaryDirectory(prefix="asr-merge-eval-") as work:
        log = Path(work) / LOG_NAME
        try:
            evaluation = evaluate_models(backend, config, progress, toolkit_log=log)
        except BaseException:
            if log.is_file():
                sys.stderr.write(log.read_text(encoding="utf-8", errors="replace"))
            raise
        transcripts = write_transcripts(backend, config, evaluation)
        files = {**write_report(evaluation.report, config.output_dir), "transcripts": transcripts}
        if log.is_file():
            files["log"] = Path(config.output_dir) / LOG_NAME
            write_atomically(files["log"], lambda tmp: shutil.copyfile(log, tmp))
    print(render_markdown(evaluation.report))
    return evaluation.report, files
