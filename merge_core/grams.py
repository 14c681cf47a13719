"""Gram matrices of each linear layer's inputs: what ``method: regmean`` merges with.

RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models")
merges a linear layer y = W x of experts 1..n from the Gram matrices G_i = X_i^T X_i of
that layer's inputs X_i in each expert, on a few batches of the expert's own domain.
They are collected once per expert, through the toolkit's own forward, by
``asr-merge grams`` (:class:`GramCollector`, fed by the toolkit adapter), and stored beside
the expert, so a merge needs no data:

- **where**: ``<expert path>.regmean.safetensors`` beside the checkpoint
  (``expert.nemo.regmean.safetensors``, ``save/CKPT+x.regmean.safetensors``: beside a
  ``CKPT+`` folder, not inside, where a merge would copy it into its output);
- **what**: one float32 matrix per layer, keyed by its weight's name in the checkpoint
  (``encoder.layers.0.feed_forward1.linear1.weight``, ``model.2.w.weight``), holding the
  mean X^T X / N over the N real input rows (the per-row mean of the reference
  implementations, so an expert counts by its recipe weight, not by how many frames were
  collected), and under the metadata key ``regmean`` the row counts, batches,
  utterances, the manifest's and the expert's SHA-256 (:func:`weights_digest`).

**Layers**: ``nn.Linear``, and ``nn.Conv1d`` of kernel 1, stride 1, one group, no
padding: a linear map applied to every frame (NeMo's Conformer pointwise convolutions
and CTC decoder, SpeechBrain's conformer bottleneck), so RegMean's regression holds for
it unchanged. Other tensors have no Gram and are averaged.

**Rows**: every frame of every utterance, padding excluded. Inputs are taken channels
last; in a 3-D input the axis as long as the batch is the batch axis (a layer's layout
is remembered: an input whose time axis happens to be as long as the batch is skipped
until the layer has shown it), and frame t of utterance b is real when t < its length at
that time axis. Lengths come from the toolkit: reported exactly where its modules return
them (:meth:`GramCollector.report_lengths`, NeMo), or relative lengths times the axis,
rounded (SpeechBrain's own convention). An input whose axis has no lengths yet is held
until they are reported, and skipped (recorded in the file) if they never are. An input
broadcast over the batch (leading axis 1, or none as long as the batch: relative
positional encodings, [1, 2T-1, C]) is the same for every utterance: every row counts.
With one utterance a batch nothing is padded.

**Precision**: each batch's X^T X is computed in float32 (float64 for float64 inputs) on
the model's device and summed in float32, as the reference implementations do: the
rounding (about 1e-6 relative over hundreds of batches) is far below the sampling error
of a Gram estimated from a few batches (1/sqrt(N), about 1e-2), and a float64 sum would
double the memory of the largest part of the collection. The merge solves in float64.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from merge_core.atomic import write_atomically
from merge_core.checkpoint.base import CheckpointReader
from merge_core.checkpoint.provenance import file_sha256, package_version
from merge_core.checkpoint.safetensors_io import SafetensorsReader
from merge_core.errors import CheckpointError, RecipeError, TensorMismatchError
from merge_core.evaluation.manifests import Utterance

GRAM_SUFFIX = ".regmean.safetensors"
METADATA_KEY = "regmean"
FORMAT = 1
COMMAND = "asr-merge grams CONFIG.yaml"


def gram_path(model: str | Path) -> Path:
    """Where the Gram file of the checkpoint ``model`` lives: beside it, its name plus ``.regmean.safetensors``.

    >>> str(gram_path("experts/noisy.nemo")), str(gram_path("save/CKPT+noisy/"))
    ('experts/noisy.nemo.regmean.safetensors', 'save/CKPT+noisy.regmean.safetensors')
    """
    model = Path(model)
    return model.with_name(model.name + GRAM_SUFFIX)


def weights_digest(model: str | Path) -> str:
    """SHA-256 of a checkpoint: of the file, or for a folder (sharded safetensors, a
    ``CKPT+`` folder) of the names and SHA-256 of the files directly in it."""
    model = Path(model)
    if not model.is_dir():
        return file_sha256(model)
    listing = "".join(f"{f.name}\0{file_sha256(f)}\n" for f in sorted(model.iterdir()) if f.is_file())
    return hashlib.sha256(listing.encode()).hexdigest()


def is_pointwise(module: nn.Module) -> bool:
    """Whether ``module`` applies one linear map to every input row: ``nn.Linear``, or an
    ``nn.Conv1d`` of kernel 1, stride 1, one group and no padding."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv1d)
        and module.kernel_size == (1,)
        and module.stride == (1,)
        and module.groups == 1
        and module.padding in ((0,), "valid")
    )


def linear_layers(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """The pointwise layers of ``module`` (:func:`is_pointwise`) by the name of their
    weight in a state dict of ``module`` whose keys start with ``prefix``."""
    return {f"{prefix}{name}.weight": m for name, m in module.named_modules() if is_pointwise(m)}


@dataclass
class Grams:
    """What a collection gathered: per weight name the mean X^T X (float32, CPU) and its
    row count, the batches and utterances seen, the layers skipped (why) and never run."""

    matrices: dict[str, torch.Tensor]
    rows: dict[str, int]
    batches: int
    utterances: int
    skipped: dict[str, str] = field(default_factory=dict)
    not_run: list[str] = field(default_factory=list)


@dataclass
class _Batch:
    size: int
    relative: torch.Tensor | None
    lengths: dict[int, torch.Tensor] = field(default_factory=dict)
    pending: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (weight name, [B, T, C] input)


class GramCollector:
    """Forward hooks on linear layers that sum X^T X over the real frames (module docstring)
    of every batch a toolkit's own forward runs.

    ``with GramCollector(linear_layers(model)) as collector:`` then, before each batch's
    forward, :meth:`start_batch`; where the toolkit states the lengths of a time axis,
    :meth:`report_lengths`; at the end :meth:`finish`.
    """

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.layers = dict(layers)
        self._sums: dict[str, torch.Tensor] = {}
        self._rows: dict[str, int] = {}
        # a layer's batch axis in its 3-D channels-last inputs; a Conv1d's is 0
        self._layouts: dict[str, int] = {n: 0 for n, m in self.layers.items() if isinstance(m, nn.Conv1d)}
        self._skipped: dict[str, tuple[str, int]] = {}
        self._handles: list[Any] = []
        self._batch: _Batch | None = None
        self.batches = 0
        self.utterances = 0

    def __enter__(self) -> "GramCollector":
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(functools.partial(self._observe, name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start_batch(self, size: int, relative: torch.Tensor | None = None) -> None:
        """A batch of ``size`` utterances comes next; ``relative``: each one's length as a
        fraction of the longest (SpeechBrain's ``wav_lens``), which gives the lengths of
        every time axis. Closes the previous batch."""
        self._close_batch()
        self._batch = _Batch(size, None if relative is None else relative.detach().float())
        self.batches += 1
        self.utterances += size

    def report_lengths(self, frames: int, lengths: torch.Tensor) -> None:
        """The real length of each utterance of this batch on a time axis of ``frames``
        frames, as a toolkit module returned it; inputs held for it are counted now."""
        batch = self._batch
        if batch is None:
            return
        batch.lengths[frames] = lengths.detach().long()
        waiting = [(n, x) for n, x in batch.pending if x.shape[1] == frames]
        batch.pending = [(n, x) for n, x in batch.pending if x.shape[1] != frames]
        for name, x in waiting:
            self._add_frames(name, x, batch.lengths[frames])

    def finish(self) -> Grams:
        """Close the last batch; the means, counts and what was skipped."""
        self._close_batch()
        self._batch = None
        matrices = {n: (s / self._rows[n]).to("cpu", torch.float32) for n, s in self._sums.items()}
        skipped = {n: f"{why} ({count} call(s))" for n, (why, count) in self._skipped.items()}
        not_run = [n for n in self.layers if n not in self._rows and n not in self._skipped]
        return Grams(matrices, dict(self._rows), self.batches, self.utterances, skipped, not_run)

    def _close_batch(self) -> None:
        if self._batch is not None:
            for name, x in self._batch.pending:
                self._skip(name, f"no lengths were reported for its time axis of {x.shape[1]} frames")
        self._batch = None

    def _skip(self, name: str, why: str) -> None:
        _, count = self._skipped.get(name, (why, 0))
        self._skipped[name] = (why, count + 1)

    def _observe(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        batch = self._batch
        if batch is None or not inputs or not torch.is_tensor(inputs[0]):
            return
        x = inputs[0].detach()
        if isinstance(module, nn.Conv1d):
            x = x.transpose(-1, -2)  # channels last
        if batch.size == 1 or (x.dim() == 2 and x.shape[0] == batch.size):
            self._add(name, x.reshape(-1, x.shape[-1]))
            return
        if x.dim() != 3:
            self._skip(name, f"an input of shape {tuple(x.shape)} has no (batch, time) axes to tell padding by")
            return
        lead, second = x.shape[0] == batch.size, x.shape[1] == batch.size
        if x.shape[0] == 1 or not (lead or second):  # the same rows for every utterance (relative positions)
            self._add(name, x.reshape(-1, x.shape[-1]))
            return
        if lead and second and name not in self._layouts:
            self._skip(name, "its batch and time axes were of equal length before its layout was seen")
            return
        axis = self._layouts[name] if lead and second else self._layouts.setdefault(name, 0 if lead else 1)
        x = x if axis == 0 else x.transpose(0, 1)
        lengths = self._lengths(batch, x.shape[1])
        if lengths is None:
            batch.pending.append((name, x.clone()))
        else:
            self._add_frames(name, x, lengths)

    @staticmethod
    def _lengths(batch: _Batch, frames: int) -> torch.Tensor | None:
        if frames in batch.lengths:
            return batch.lengths[frames]
        if batch.relative is not None:
            return torch.round(batch.relative * frames).long()
        return None

    def _add_frames(self, name: str, x: torch.Tensor, lengths: torch.Tensor) -> None:
        """x: [B, T, C]; rows t < lengths[b] of each utterance b."""
        real = torch.arange(x.shape[1], device=x.device) < lengths.to(x.device)[:, None]
        self._add(name, x[real])

    def _add(self, name: str, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32)
        gram = rows.T @ rows
        if name in self._sums:
            self._sums[name] += gram
        else:
            self._sums[name] = gram
        self._rows[name] = self._rows.get(name, 0) + rows.shape[0]


# ---------------------------------------------------------------------------
# the command's config


def _count(key: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise RecipeError(f"Gram config key {key!r} must be an integer >= {least}, got {value!r}")
    return value


def _text(key: str, value: Any) -> str:
    if not isinstance(value, (str, Path)) or not str(value):
        raise RecipeError(f"Gram config key {key!r} must be a non-empty string, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class GramConfig:
    """The keys of ``asr-merge grams`` that every toolkit reads.

    ``model``: the expert's checkpoint (or, NeMo only, ``pretrained_name``); ``manifest``:
    its own domain's training manifest (NeMo JSONL, SpeechBrain CSV); ``max_utterances``
    and ``batches`` take the manifest's first utterances (all by default); ``output``:
    default :func:`gram_path` of ``model``, the only place a merge looks.
    """

    manifest: Path
    model: Path | None = None
    pretrained_name: str | None = None
    output: Path | None = None
    batch_size: int = 8
    batches: int | None = None
    max_utterances: int | None = None
    device: str = "auto"
    toolkit: str = "nemo"

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Any] | DictConfig, toolkit_keys: Sequence[str] = ()
    ) -> tuple["GramConfig", dict[str, Any]]:
        """The shared keys, validated, and the toolkit's own ``toolkit_keys`` as given;
        any other key is an error naming the known ones."""
        if isinstance(raw, DictConfig):
            raw = OmegaConf.to_container(raw, resolve=True)
        if not isinstance(raw, Mapping):
            raise RecipeError(f"a Gram config must be a mapping of keys, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__) | set(toolkit_keys)
        unknown = sorted(map(str, set(raw) - known))
        if unknown:
            raise RecipeError(f"unknown Gram config key(s) {unknown}; known keys: {sorted(known)}")
        if bool(raw.get("model")) == bool(raw.get("pretrained_name")):
            raise RecipeError(
                "a Gram config needs exactly one of 'model' (the expert's checkpoint) or 'pretrained_name'"
            )
        if not raw.get("manifest"):
            raise RecipeError("Gram config key 'manifest' is required: the expert's own training manifest")
        if raw.get("pretrained_name") and not raw.get("output"):
            raise RecipeError("a pretrained model has no checkpoint to put its Gram file beside: set 'output'")
        optional = {k: raw[k] for k in ("batches", "max_utterances") if raw.get(k) is not None}
        config = cls(
            manifest=Path(_text("manifest", raw["manifest"])),
            model=Path(_text("model", raw["model"])) if raw.get("model") else None,
            pretrained_name=_text("pretrained_name", raw["pretrained_name"]) if raw.get("pretrained_name") else None,
            output=Path(_text("output", raw["output"])) if raw.get("output") else None,
            batch_size=_count("batch_size", raw.get("batch_size", 8), 1),
            device=_text("device", raw.get("device", "auto")),
            toolkit=_text("toolkit", raw.get("toolkit", "nemo")),
            **{k: _count(k, v, 1) for k, v in optional.items()},
        )
        if config.model is not None and not config.model.exists():
            raise RecipeError(f"Gram config key 'model': {config.model} does not exist")
        return config, {k: raw[k] for k in toolkit_keys if k in raw}

    def destination(self) -> Path:
        return self.output if self.output is not None else gram_path(self.model)

    def choose(self, utterances: list[Utterance]) -> list[Utterance]:
        """The manifest's first ``max_utterances``, at most ``batches`` batches of them."""
        limits = [n for n in (self.max_utterances, self.batches and self.batches * self.batch_size) if n]
        return utterances[: min(limits)] if limits else utterances

    def resolved_device(self) -> str:
        """``device``, with ``auto`` meaning CUDA when torch sees a GPU."""
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


def write_grams(config: GramConfig, grams: Grams, weights: Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``grams`` of the checkpoint ``weights`` collected as ``config`` says to
    ``config.destination()`` atomically, with the record described in the module
    docstring (plus ``extra``, the toolkit's settings); returns the path."""
    from safetensors.torch import save_file

    if not grams.matrices:
        raise RecipeError(
            f"{config.model or config.pretrained_name}: no linear layer ran on {config.manifest}: no Gram to write"
        )
    record = {
        "format": FORMAT,
        "statistic": "mean of x x^T over the real input rows",
        "toolkit": config.toolkit,
        "model": str(weights.resolve()),
        "weights_sha256": weights_digest(weights),
        "manifest": str(config.manifest.resolve()),
        "manifest_sha256": file_sha256(config.manifest),
        "utterances": grams.utterances,
        "batches": grams.batches,
        "batch_size": config.batch_size,
        "rows": grams.rows,
        "skipped": grams.skipped,
        "not_run": grams.not_run,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "asr_merge": package_version(),
        **dict(extra or {}),
    }
    tensors = {name: m.contiguous() for name, m in grams.matrices.items()}
    metadata = {METADATA_KEY: json.dumps(record, sort_keys=True)}
    destination = config.destination()

    def save(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.chmod(0o644)  # safetensors creates files 0600: a Gram file is read like its checkpoint

    write_atomically(destination, save)
    return destination


def read_record(path: str | Path) -> dict[str, Any]:
    """The metadata record of a Gram file (see the module docstring)."""
    with SafetensorsReader(Path(path)) as reader:
        return _record(reader)


def _record(reader: SafetensorsReader) -> dict[str, Any]:
    try:
        record = json.loads(reader.metadata[METADATA_KEY])
    except (KeyError, ValueError):
        raise CheckpointError(f"{reader.path}: not a Gram file of {COMMAND} (no {METADATA_KEY!r} metadata)") from None
    if not isinstance(record, dict) or not isinstance(record.get("weights_sha256"), str):
        raise CheckpointError(f"{reader.path}: malformed {METADATA_KEY!r} metadata")
    return record


# ---------------------------------------------------------------------------
# a merge's Gram files


@dataclass
class GramFiles:
    """Each member's Gram file, open as a memory map, in the order of the members."""

    members: list[Path]
    readers: list[SafetensorsReader]
    names: frozenset[str]

    def for_tensor(self, name: str) -> list[torch.Tensor] | None:
        """Each member's Gram of weight ``name``, or None when it has none."""
        return [r.get(name) for r in self.readers] if name in self.names else None

    def check_against(self, template: CheckpointReader) -> None:
        """Each Gram names a weight of ``template`` of shape (out, in) or (out, in, 1) and is (in, in)."""
        reader, tensors = self.readers[0], set(template.keys())
        for name in sorted(self.names):
            if name not in tensors:
                raise TensorMismatchError(f"{reader.path}: Gram {name!r} names no tensor of {template.path}")
            weight = template.spec(name).shape
            gram = reader.spec(name).shape
            if len(weight) not in (2, 3) or weight[2:] not in ((), (1,)) or gram != (weight[1], weight[1]):
                raise TensorMismatchError(
                    f"{reader.path}: Gram {name!r} has shape {gram}, its weight in {template.path} has shape "
                    f"{weight}: a linear weight (out, in) or (out, in, 1) takes an (in, in) Gram"
                )

    def provenance(self) -> list[dict[str, Any]]:
        """Each Gram file's path, SHA-256 and what it was collected on, for the merge's record."""
        kept = ("manifest", "manifest_sha256", "utterances", "batches", "weights_sha256")
        return [
            {
                "model": str(m),
                "path": str(r.path),
                "sha256": file_sha256(r.path),
                **{k: _record(r).get(k) for k in kept},
            }
            for m, r in zip(self.members, self.readers)
        ]

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def _missing(members: Sequence[Path], method: str) -> RecipeError | None:
    lacking = [m for m in members if not gram_path(m).is_file()]
    if not lacking:
        return None
    listed = "; ".join(f"{m} has none ({gram_path(m)} does not exist)" for m in lacking)
    return RecipeError(
        f"method {method!r} needs a Gram file beside each merged model: {listed}. Collect each with "
        f"`{COMMAND} model={lacking[0]} manifest=<its training manifest>` (README: Gram matrices for regmean)"
    )


@contextlib.contextmanager
def open_gram_files(members: Sequence[str | Path], method: str) -> Iterator[GramFiles]:
    """The Gram files of ``members`` (checkpoint paths, in merge order), checked before
    any tensor is read: all present, each collected from these very weights, all on the
    same layers. Shapes are checked against the template by :meth:`GramFiles.check_against`."""
    members = [Path(m) for m in members]
    missing = _missing(members, method)
    if missing is not None:
        raise missing
    files = GramFiles(members, [], frozenset())
    try:
        for member in members:
            reader = SafetensorsReader(gram_path(member))
            files.readers.append(reader)
            recorded, now = _record(reader)["weights_sha256"], weights_digest(member)
            if recorded != now:
                raise RecipeError(
                    f"{reader.path} was collected from other weights than {member} has now (SHA-256 "
                    f"{recorded[:12]}... recorded, {now[:12]}... now): collect it again with {COMMAND}"
                )
        sets = [frozenset(r.keys()) for r in files.readers]
        for reader, names in zip(files.readers[1:], sets[1:]):
            if names != sets[0]:
                odd = sorted(names ^ sets[0])[:3]
                raise RecipeError(
                    f"{reader.path} and {files.readers[0].path} hold Grams of different layers (e.g. {odd}; "
                    "their metadata lists what was skipped or never ran): collect them again with the same settings"
                )
        files.names = sets[0]
        yield files
    finally:
        files.close()
