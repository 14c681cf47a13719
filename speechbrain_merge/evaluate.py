"""Forgetting evaluation of SpeechBrain ASR models on SpeechBrain CSV manifests.

    python -m speechbrain_merge.evaluate configs/speechbrain/eval.yaml --output_dir=outputs/eval_sb
    asr-merge eval configs/speechbrain/eval.yaml models.1.model=results/aode/save/CKPT+aode

The keys shared with NeMo (``models``, ``manifests``, ``forgetting_sets``,
``normalization``, ``batch_size``, ``max_utterances``, ``device``, ``output_dir``,
``cache``...) are documented in :mod:`merge_core.evaluation.runner`; ``manifests`` are
CSVs in ``librispeech_prepare.py``'s layout. SpeechBrain adds:

- ``hparams``: the inference HyperPyYAML used for models given as checkpoint folders
  (e.g. ``configs/speechbrain/tiny_ctc_inference.yaml``);
- ``hparams_overrides``: overrides of it, as ``from_hparams(overrides=...)`` takes them
  (e.g. ``{tokenizer_file: results/tiny/tokenizer/40_unigram.model}``);
- ``interface``: the ``speechbrain.inference.ASR`` class, ``EncoderASR`` (default),
  ``EncoderDecoderASR`` or ``WhisperASR`` (e.g. ``configs/speechbrain/whisper_inference.yaml``);
- ``data_root``: the value of ``$data_root`` in the CSVs' ``wav`` column;
- ``encoder_states_dir`` (``WhisperASR`` only): a folder where encoder outputs are kept
  per (encoder weights, audio file) and reused by every model whose encoder is
  bit-identical, as decoder-only experts and their merges are
  (:class:`speechbrain_merge.whisper.EncoderStates`); the transcripts do not change.

A model is named in one of two ways:

- ``model: save/CKPT+...``, a ``Checkpointer`` folder. A ``from_hparams`` source is
  assembled in a temporary folder: ``hparams`` as ``hyperparams.yaml`` beside links to
  the checkpoint's ``<recoverable>.ckpt`` files, so the pretrainer loads each loadable
  it names (``model``, ``normalizer``) from the recoverable of that name.
- ``pretrained_name: SOURCE``, a ``from_hparams`` source as published: a Hugging Face
  id, or a local folder with ``hyperparams.yaml`` and its ``.ckpt`` files.

Either way the interface decodes with its own batched ``transcribe_batch``. Each set's
transcripts are a CSV (:data:`TRANSCRIPT_COLUMNS`): the manifest's ``ID`` and ``wrd``, the
hypothesis, and the utterance's substitutions, deletions, insertions and reference words
after normalisation (0 words: skipped as empty).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from merge_core import MergeError
from merge_core.atomic import discard
from merge_core.errors import EvaluationError
from merge_core.evaluation.cache import canonical_json
from merge_core.evaluation.runner import Backend, EvalConfig, ModelSpec, run_evaluation
from merge_core.evaluation.manifests import Utterance, read_speechbrain_csv
from merge_core.evaluation.wer import WerStats
from merge_core.checkpoint.provenance import file_sha256
from merge_core.recipes.config import load_yaml_config
from speechbrain_merge.arguments import parse_arguments
from speechbrain_merge.checkpoint_io import PARAM_SUFFIX, not_a_checkpoint_reason, tensor_state_dict
from speechbrain_merge.whisper import EncoderStates, encode_audio

INTERFACES = ("EncoderASR", "EncoderDecoderASR", "WhisperASR")
TRANSCRIPT_COLUMNS = ("ID", "wrd", "hypothesis", "substitutions", "deletions", "insertions", "words")


@dataclass(frozen=True)
class SpeechBrainOptions:
    """The evaluation keys only SpeechBrain has (see the module docstring)."""

    hparams: Path | None = None
    hparams_overrides: Mapping[str, Any] = field(default_factory=dict)
    interface: str = "EncoderASR"
    data_root: str | None = None
    encoder_states_dir: Path | None = None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "SpeechBrainOptions":
        interface = raw.get("interface") or "EncoderASR"
        if interface not in INTERFACES:
            raise EvaluationError(
                f"evaluation key 'interface' must be one of {', '.join(INTERFACES)}, got {interface!r}"
            )
        overrides = raw.get("hparams_overrides") or {}
        if not isinstance(overrides, Mapping):
            raise EvaluationError(f"evaluation key 'hparams_overrides' must be a mapping, got {overrides!r}")
        hparams = Path(raw["hparams"]).resolve() if raw.get("hparams") else None
        if hparams is not None and not hparams.is_file():
            raise EvaluationError(f"evaluation key 'hparams': {raw['hparams']!r} is not a file")
        data_root = raw.get("data_root")
        states = raw.get("encoder_states_dir")
        if states is not None and interface != "WhisperASR":
            raise EvaluationError(f"evaluation key 'encoder_states_dir' is for interface WhisperASR, not {interface}")
        return cls(hparams, dict(overrides), interface, None if data_root is None else str(data_root),
                   None if states is None else Path(states).resolve())


def split_config(raw: Mapping[str, Any] | DictConfig) -> tuple[SpeechBrainOptions, EvalConfig]:
    """The SpeechBrain keys and the toolkit-free evaluation config of one mapping."""
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    raw = dict(raw)
    options = SpeechBrainOptions.from_mapping(
        {k: raw.pop(k) for k in SpeechBrainOptions.__dataclass_fields__ if k in raw}
    )
    if raw.setdefault("toolkit", "speechbrain") != "speechbrain":
        raise EvaluationError(
            f"evaluation key 'toolkit' is {raw['toolkit']!r}; this back end evaluates 'speechbrain' models"
        )
    if raw.get("decoding") is not None:
        raise EvaluationError(
            "evaluation key 'decoding' is NeMo's; for SpeechBrain set decoding keys in 'hparams_overrides'"
        )
    config = EvalConfig.from_mapping(raw)
    unbuilt = [m.name for m in config.models if m.model is not None and options.hparams is None]
    if unbuilt:
        raise EvaluationError(
            f"models {unbuilt} are checkpoint folders: set 'hparams' (an inference HyperPyYAML) to decode them"
        )
    return options, config


def _digest(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(parts, "weights digest").encode()).hexdigest()


def _files_digests(files: Sequence[Path]) -> dict[str, str]:
    return {str(f): file_sha256(f) for f in files}


def checkpoint_digest(folder: Path, options: SpeechBrainOptions) -> str:
    """Changes with the folder's ``.ckpt`` files, the inference hparams, their overrides
    and the files the overrides name (a tokenizer); not with ``CKPT.yaml``'s time stamp."""
    overrides = options.hparams_overrides
    referenced = [Path(v) for v in overrides.values() if isinstance(v, str) and Path(v).is_file()]
    parts = {
        "checkpoint": _files_digests(sorted(p for p in folder.iterdir() if p.suffix == PARAM_SUFFIX)),
        "hparams": file_sha256(options.hparams),
        "overrides": dict(overrides),
        "files_in_overrides": _files_digests(referenced),
    }
    return _digest(parts)


def source_digest(source: str) -> str:
    """A local ``from_hparams`` folder by its files' bytes; a hub id by its name."""
    if Path(source).is_dir():
        return _digest({"source": _files_digests(sorted(p for p in Path(source).rglob("*") if p.is_file()))})
    return f"pretrained:{source}"


def checkpoint_folder(spec: ModelSpec) -> Path:
    """The ``model`` of ``spec`` as a checkpoint folder; the error says what it is instead."""
    folder = Path(spec.model)
    reason = not_a_checkpoint_reason(folder)
    if reason:
        raise EvaluationError(f"model {spec.name!r}: {folder}: {reason}")
    return folder


def assemble_source(checkpoint: Path, hparams: Path, dest: Path) -> Path:
    """A ``from_hparams`` source in ``dest``: ``hparams`` as ``hyperparams.yaml`` and
    links to the checkpoint's ``<recoverable>.ckpt`` files."""
    dest.mkdir(parents=True)
    (dest / "hyperparams.yaml").symlink_to(hparams)
    for file in checkpoint.iterdir():
        if file.suffix == PARAM_SUFFIX:
            (dest / file.name).symlink_to(file.resolve())
    return dest


def non_strict_loadables(pretrainer: Any) -> Iterator[tuple[str, torch.nn.Module, Path]]:
    """(name, module, file) of each loadable the pretrainer loaded with SpeechBrain's
    default transfer hook for modules, which only logs missing and unexpected keys."""
    from speechbrain.utils.checkpoints import DEFAULT_TRANSFER_HOOKS, get_default_hook, torch_parameter_transfer

    for loadable, obj in pretrainer.loadables.items():
        if loadable in pretrainer.custom_hooks or loadable not in pretrainer.paths:
            continue
        if get_default_hook(obj, DEFAULT_TRANSFER_HOOKS) is torch_parameter_transfer:
            yield loadable, obj, Path(pretrainer.paths[loadable])


def check_transferred(asr: Any, name: str) -> None:
    """Refuse a file whose keys differ from its module's: the non-strict load would
    leave the module's missing parameters at their random initial values."""
    for loadable, module, path in non_strict_loadables(asr.hparams.pretrainer):
        stored = tensor_state_dict(path)
        if stored is None:
            continue  # not a flat tensor file: nothing to compare
        expected = set(module.state_dict())
        if set(stored) != expected:
            missing, extra = sorted(expected - set(stored))[:5], sorted(set(stored) - expected)[:5]
            raise EvaluationError(
                f"model {name!r}: {path.resolve()} does not fit the hparams' {loadable!r} "
                f"(missing {missing}, unexpected {extra})"
            )


def load_interface(spec: ModelSpec, options: SpeechBrainOptions, folder: Path, device: str) -> Any:
    """The ``speechbrain.inference.ASR`` interface of ``spec``, built in ``folder``."""
    from speechbrain.inference import ASR

    interface = getattr(ASR, options.interface)
    kwargs = {"savedir": str(folder / "collected"), "run_opts": {"device": device}}
    if spec.model is not None:
        source = str(assemble_source(checkpoint_folder(spec), options.hparams, folder / "source"))
        kwargs["overrides"] = dict(options.hparams_overrides)
    else:
        source = spec.pretrained_name
    try:
        asr = interface.from_hparams(source=source, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        what = f"{spec.model} with {options.hparams}" if spec.model is not None else source
        raise EvaluationError(f"model {spec.name!r}: cannot build {options.interface} from {what} ({e})") from None
    check_transferred(asr, spec.name)
    return asr


def padded_batch(asr: Any, utterances: Sequence[Utterance]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(waveforms, relative lengths)``: the utterances as the interface loads them, padded into one batch."""
    from speechbrain.utils.data_utils import batch_pad_right

    return batch_pad_right([asr.load_audio(str(u.audio)) for u in utterances])


def transcribe_batch(asr: Any, utterances: Sequence[Utterance]) -> list[str]:
    """One padded batch through the interface's ``transcribe_batch``."""
    words, _tokens = asr.transcribe_batch(*padded_batch(asr, utterances))
    return [str(w) for w in words]


def transcribe_whisper_batch(asr: Any, utterances: Sequence[Utterance], store: EncoderStates) -> list[str]:
    """``WhisperASR.transcribe_batch`` with the encoder outputs taken from ``store``
    when this model's encoder already produced them."""
    wavs, wav_lens = padded_batch(asr, utterances)
    whisper = asr.mods.whisper
    states = store.states(whisper, [u.audio for u in utterances], lambda i: encode_audio(whisper, wavs[i].to(asr.device)))
    with torch.no_grad():
        tokens, _, _, _ = asr.mods.decoder(states.to(asr.device), wav_lens.float().to(asr.device))
    return [asr.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


class SpeechBrainBackend(Backend):
    toolkit = "speechbrain"
    transcript_suffix = ".csv"

    def __init__(self, options: SpeechBrainOptions, workdir: Path) -> None:
        import speechbrain.inference  # noqa: F401  (its loggers exist before the evaluation redirects them)

        self.options = options
        self.workdir = workdir
        self._loaded: dict[str, tuple[Any, Path]] = {}

    def read_manifest(self, path: Path) -> list[Utterance]:
        replacements = {} if self.options.data_root is None else {"data_root": self.options.data_root}
        return read_speechbrain_csv(path, replacements)

    def weights_digest(self, spec: ModelSpec) -> str:
        if spec.model is not None:
            return checkpoint_digest(checkpoint_folder(spec), self.options)
        return source_digest(spec.pretrained_name)

    def decoding_settings(self, config: EvalConfig) -> dict[str, Any]:
        import speechbrain

        return {
            "toolkit": "speechbrain",
            "speechbrain": speechbrain.__version__,
            "interface": self.options.interface,
            "batch_size": config.batch_size,  # padding changes the features of the shorter utterances
            "data_root": self.options.data_root,  # the CSV's bytes do not say which audio $data_root names
        }

    def _interface(self, spec: ModelSpec, config: EvalConfig) -> Any:
        if spec.name not in self._loaded:
            folder = Path(tempfile.mkdtemp(prefix="model-", dir=self.workdir))
            self._loaded[spec.name] = (load_interface(spec, self.options, folder, config.resolved_device()), folder)
        return self._loaded[spec.name][0]

    def transcribe(self, spec: ModelSpec, utterances: list[Utterance], config: EvalConfig) -> list[str]:
        asr = self._interface(spec, config)
        size = config.batch_size
        states = self.options.encoder_states_dir
        if states is None:
            batch = transcribe_batch
        else:
            batch = functools.partial(transcribe_whisper_batch, store=EncoderStates(states))
        return [h for start in range(0, len(utterances), size) for h in batch(asr, utterances[start : start + size])]

    def format_transcripts(self, manifest: Path, hypotheses: Sequence[str], scores: Sequence[WerStats]) -> str:
        """CSV of :data:`TRANSCRIPT_COLUMNS`, one row per utterance in the manifest's order."""
        with open(manifest, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(TRANSCRIPT_COLUMNS)
        for row, text, s in zip(rows, hypotheses, scores):
            writer.writerow([row["ID"], row["wrd"], text, s.substitutions, s.deletions, s.insertions, s.words])
        return out.getvalue()

    def release(self, spec: ModelSpec) -> None:
        _, folder = self._loaded.pop(spec.name, (None, None))
        if folder is not None:
            discard(folder)


def evaluate(config: Mapping[str, Any] | DictConfig, progress: bool = True) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the evaluation described by ``config``; returns the report and its files."""
    options, eval_config = split_config(config)
    with tempfile.TemporaryDirectory(prefix="asr-merge-sb-") as work:
        return run_evaluation(SpeechBrainBackend(options, Path(work)), eval_config, progress)


def main(argv: Sequence[str] | None = None) -> int:
    config_file, run_opts, overrides = parse_arguments(sys.argv[1:] if argv is None else argv)
    if "device" in run_opts.overridden_args:  # SpeechBrain parses --device as a run option
        overrides.append(f"device={json.dumps(run_opts.device)}")
    try:
        _, files = evaluate(load_yaml_config(config_file, overrides, "evaluation config"))
    except MergeError as e:
        print(f"speechbrain_merge.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(f) for f in files.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
