"""The streaming merge engine: one tensor name at a time, in bounded memory.

For each name the engine reads that tensor from the base and every expert (memory
maps, so untouched bytes never become private memory), checks it, hands it to the
method in float32 (float64 for float64 inputs), casts the result back to the base's
dtype and passes it to the writer, which appends it to a temporary file. Peak private
memory is therefore a few times the largest tensor, whatever the number of experts.
A model-wide ``trim_scope`` adds one read-only pass before the merge.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from merge_core.atomic import output_errors
from merge_core.checkpoint import CheckpointReader, TensorSpec, create_writer, open_checkpoint
from merge_core.errors import CheckpointError, NonFiniteError, RecipeError, TensorMismatchError
from merge_core.checkpoint.provenance import hash_in_background, provenance_record
from merge_core.grams import GramFiles, open_gram_files
from merge_core.registry import TensorInputs
from merge_core.methods.sparsify import ModelMagnitudeTrim, magnitude_trim
from merge_core.parallel import THREADS_FROM, in_threads, numpy_ready

if TYPE_CHECKING:
    from merge_core.recipes.merge import Recipe

MERGE, NON_FLOAT, EXCLUDED = "merge", "non_float", "excluded"
_LISTED = 5


@dataclass
class Inputs:
    """Open readers for the recipe's base and experts; ``template`` decides output
    names, shapes and dtypes (the base, or the first model when there is none).
    ``grams``: the members' Gram files, for a method that needs them."""

    base: CheckpointReader | None
    models: list[CheckpointReader]
    grams: GramFiles | None = None

    @property
    def template(self) -> CheckpointReader:
        return self.base if self.base is not None else self.models[0]

    def all(self) -> list[CheckpointReader]:
        return ([self.base] if self.base is not None else []) + self.models


@contextlib.contextmanager
def open_inputs(recipe: Recipe) -> Iterator[Inputs]:
    """Open every input checkpoint of ``recipe`` and check they are compatible (and,
    for a method that needs them, the members' Gram files first)."""
    with contextlib.ExitStack() as stack:
        grams = None
        if recipe.merge_method.needs_grams:
            grams = stack.enter_context(open_gram_files(member_paths(recipe), recipe.method))
        base = stack.enter_context(open_checkpoint(recipe.base_model)) if recipe.base_model else None
        models = [stack.enter_context(open_checkpoint(m.model)) for m in recipe.models]
        inputs = Inputs(base, models, grams)
        check_compatible(inputs.template, [r for r in inputs.all() if r is not inputs.template])
        if grams is not None:
            grams.check_against(inputs.template)
        yield inputs


def member_paths(recipe: Recipe) -> list[str]:
    """The merged members' checkpoints in the order a method sees them: the base first when it is one."""
    return ([recipe.base_model] if recipe.include_base else []) + [m.model for m in recipe.models]


def _first(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _LISTED else ""
    return ", ".join(repr(n) for n in names[:_LISTED]) + more


def check_compatible(template: CheckpointReader, others: list[CheckpointReader]) -> None:
    """Same key set, shapes and dtype kinds (floating vs integer/bool) as the template,
    and whatever the reader's kind checks besides."""
    keys = template.keys()
    key_set = set(keys)
    for reader in others:
        reader.check_compatible_with(template)
        theirs = set(reader.keys())
        missing = [k for k in keys if k not in theirs]
        extra = [k for k in reader.keys() if k not in key_set]
        if missing or extra:
            parts = ([f"missing {_first(missing)}"] if missing else []) + ([f"extra {_first(extra)}"] if extra else [])
            raise TensorMismatchError(f"{reader.path}: tensor names differ from {template.path}: {'; '.join(parts)}")
        for name in keys:
            a, b = template.spec(name), reader.spec(name)
            if a.shape != b.shape:
                raise TensorMismatchError(
                    f"{reader.path}: tensor {name!r} has shape {b.shape}, {template.path} has {a.shape}"
                )
            if a.dtype.is_floating_point != b.dtype.is_floating_point:
                raise TensorMismatchError(
                    f"{reader.path}: tensor {name!r} is {b.dtype}, {template.path} has {a.dtype} (a different kind)"
                )


def plan_actions(recipe: Recipe, template: CheckpointReader) -> dict[str, str]:
    """For each tensor name: merged, or copied from the template because it is not
    floating point (integer/bool buffers are never averaged) or not selected."""
    actions = {}
    for name in template.keys():
        if not template.spec(name).dtype.is_floating_point:
            actions[name] = NON_FLOAT
        elif recipe.selects(name):
            actions[name] = MERGE
        else:
            actions[name] = EXCLUDED
    return actions


def available_memory() -> int | None:
    """Bytes of memory the system can give now (Linux ``MemAvailable``); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(inputs: Inputs, actions: dict[str, str]) -> None:
    """Refuse, before any tensor is read, a merge whose largest merged tensor cannot be
    held: merging one tensor holds it in the compute dtype once per input, plus the
    result and one scratch copy. Headers are taken at their word here, so a file that
    claims a huge tensor is refused rather than allowed to exhaust memory."""
    merged = [n for n, a in actions.items() if a == MERGE]
    available = available_memory()
    if not merged or available is None:
        return
    specs = {n: inputs.template.spec(n) for n in merged}
    name = max(merged, key=lambda n: specs[n].numel)
    wide = any(r.spec(name).dtype == torch.float64 for r in inputs.all())
    copies = len(inputs.all()) + 2
    need = specs[name].numel * (8 if wide else 4) * copies
    if need > available:
        raise CheckpointError(
            f"{inputs.template.path}: tensor {name!r} of shape {specs[name].shape} needs {need / 2**30:.1f} GiB "
            f"to merge ({copies} copies in float{64 if wide else 32}), more than the {available / 2**30:.1f} GiB "
            "of memory available; if the header is right, merge on a machine with more memory"
        )


def compute_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_finite(tensor: torch.Tensor, reader: CheckpointReader, name: str) -> None:
    # a sum is one cheap pass and is non-finite whenever an entry is; only then
    # pay for the exact check (a sum of large finite values can overflow)
    if _sum_is_finite(tensor) or torch.isfinite(tensor).all():
        return
    bad = int((~torch.isfinite(tensor)).sum())
    raise NonFiniteError(
        f"{reader.path}: tensor {name!r} holds {bad} NaN/Inf value(s); set allow_nonfinite: true to merge anyway"
    )


def _sum_is_finite(tensor: torch.Tensor) -> bool:
    if numpy_ready(tensor):  # numpy wakes no torch threads to spin beside the method's (merge_core.parallel)
        values = tensor.numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # overflow, inf - inf: the exact check follows
            return bool(np.isfinite(values.sum(dtype=values.dtype)))
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(tensor.sum(dtype=accumulate)))


@dataclass
class TensorMerger:
    """Merges one tensor name from open inputs following a recipe."""

    recipe: Recipe
    inputs: Inputs
    model_trim: ModelMagnitudeTrim | None = None
    _method: Any = field(init=False)
    _checked: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self._method = self.recipe.merge_method
        if self._method.needs_grams and self.inputs.grams is None:
            raise RecipeError(f"method {self._method.name!r} needs Gram files: open the inputs with its own recipe")
        # average/extreme/slerp without include_base never look at the base's values
        self._reads_base = self.inputs.base is not None and (self._method.needs_base or self.recipe.include_base)

    def _read(self, name: str) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.dtype]:
        base = self.inputs.base.get(name) if self._reads_base else None
        models = [r.get(name) for r in self.inputs.models]
        if not self.recipe.allow_nonfinite and name not in self._checked:
            self._checked.add(name)  # model-wide trimming reads every tensor twice
            read = ([(self.inputs.base, base)] if base is not None else []) + list(zip(self.inputs.models, models))
            in_threads(lambda pair: check_finite(pair[1], pair[0], name), read, models[0].numel() >= THREADS_FROM)
        dtype = compute_dtype(([base] if base is not None else []) + models)
        base = base.to(dtype) if base is not None else None
        return base, [m.to(dtype) for m in models], dtype

    def task_vectors(self, name: str) -> Iterator[torch.Tensor]:
        """tau_i = theta_i - theta_0 of one tensor name, one expert at a time."""
        base, models, _ = self._read(name)
        return (m - base for m in models)

    def _trim(self, name: str) -> Callable[[torch.Tensor, int, float], torch.Tensor]:
        if self.model_trim is None:
            return lambda tau, i, density: magnitude_trim(tau, density)
        return lambda tau, i, density: self.model_trim.apply((i, density), tau)

    def merge(self, name: str) -> torch.Tensor:
        base, models, dtype = self._read(name)
        weights = [m.weight for m in self.recipe.models]
        if self.recipe.include_base:
            models = [base, *models]
            weights = [self.recipe.base_weight, *weights]
        inputs = TensorInputs(
            name=name,
            base=base,
            models=models,
            weights=torch.tensor(weights, dtype=torch.float64),
            trim=self._trim(name),
            grams=self.inputs.grams.for_tensor(name) if self.inputs.grams is not None else None,
        )
        merged = self._method.fn(inputs, self.recipe.parameters_for(name))
        return merged.to(self.inputs.template.spec(name).dtype)


def _uses_model_trim(recipe: Recipe) -> bool:
    return recipe.merge_method.trims and recipe.parameters_for("").get("trim_scope") == "model"


def build_model_trim(merger: TensorMerger, names: list[str], progress: bool) -> ModelMagnitudeTrim:
    """Pass 1 of model-wide trimming: histogram every task vector's magnitudes."""
    trim = ModelMagnitudeTrim()
    for name in tqdm(names, desc="trim threshold", unit="tensor", disable=not progress):
        density = merger.recipe.parameters_for(name)["density"]
        for i, tau in enumerate(merger.task_vectors(name)):
            trim.observe((i, density), tau, density)
    trim.finalize()
    return trim


def iter_merged(
    recipe: Recipe, inputs: Inputs, order: list[str], *, actions: dict[str, str] | None = None, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every output tensor in ``order``: merged ones
    computed, the rest passed through from the template. Nothing is written, so
    callers can merge in memory or stream to a writer. ``actions``: the
    :func:`plan_actions` the caller already made (planned here otherwise)."""
    actions = plan_actions(recipe, inputs.template) if actions is None else actions
    merger = TensorMerger(recipe, inputs)
    if _uses_model_trim(recipe):
        merger.model_trim = build_model_trim(merger, [n for n in order if actions[n] == MERGE], progress)
    for name in tqdm(order, desc=recipe.method, unit="tensor", disable=not progress):
        yield name, merger.merge(name) if actions[name] == MERGE else inputs.template.get(name)


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge` wrote and how long it took."""

    output: Path
    files: list[Path]
    merged: int
    copied: int
    seconds: float
    provenance: dict[str, Any]
    summary: str = ""  # one line for people: "34 tensors merged by ties, 2 copied"

    @classmethod
    def of_stream(cls, output: Path, written: tuple[list[Path], dict[str, Any]], tensors: dict[str, Any],
                  actions: dict[str, str], start: float, summary: str) -> "MergeResult":
        """The result of a :func:`write_stream` (its ``(files, record)``) planned by ``actions``,
        ``start`` being the run's ``time.perf_counter()`` when it began."""
        files, record = written
        merged = tensors["merged"]
        return cls(output, files, merged, len(actions) - merged, time.perf_counter() - start, record, summary)


# (role, reader, weight or None): one input of a merge, as its provenance records it
InputRole = tuple[str, CheckpointReader, float | None]


def input_roles(recipe: Recipe, inputs: Inputs) -> list[InputRole]:
    """The base (with its weight when it is a member) and each model with its weight."""
    roles = [("base", recipe.base_weight if recipe.include_base else None)] if inputs.base is not None else []
    roles += [("model", m.weight) for m in recipe.models]
    return [(role, reader, weight) for (role, weight), reader in zip(roles, inputs.all())]


def input_records(roles: list[InputRole], digests: dict[Path, str]) -> list[dict[str, Any]]:
    """Each input's provenance: role, path, kind, weight and files with their SHA-256."""
    records = []
    for role, reader, weight in roles:
        files = [{"path": str(f), "bytes": f.stat().st_size, "sha256": digests.get(f)} for f in reader.files()]
        record = {"role": role, "path": str(reader.path), "kind": reader.kind, "files": files}
        if weight is not None:
            record["weight"] = weight
        records.append(record)
    return records


def write_stream(
    output: Path,
    recipe: dict[str, Any],
    roles: list[InputRole],
    template: CheckpointReader,
    tensors: dict[str, Any],
    stream: Callable[[list[str]], Iterator[tuple[str, torch.Tensor]]],
    *,
    hash_inputs: bool = True,
    shard_size: int | None = None,
) -> tuple[list[Path], dict[str, Any]]:
    """Write ``stream(order)``'s tensors into ``output`` with ``template``'s names, shapes
    and layout, hashing the inputs meanwhile, and publish it with its provenance.
    Returns the files written and the provenance record."""
    hashed = [f for _, reader, _ in roles for f in reader.files()] if hash_inputs else []
    pool, pending = hash_in_background(hashed)
    try:
        placeholder = provenance_record(recipe, input_records(roles, {p: "0" * 64 for p in pending}), tensors)
        specs: dict[str, TensorSpec] = {name: template.spec(name) for name in template.keys()}
        reserve = len(json.dumps(placeholder)) + 1024
        with output_errors(output), create_writer(output, specs, template, shard_size=shard_size, provenance_reserve=reserve) as writer:
            for name, tensor in stream(writer.order):
                writer.write(name, tensor)
            digests = {path: future.result() for path, future in pending.items()}
            record = provenance_record(recipe, input_records(roles, digests), tensors)
            return writer.commit(record), record
    finally:
        pool.shutdown(cancel_futures=True)


def tensor_record(inputs: Inputs, actions: dict[str, str]) -> dict[str, Any]:
    """The provenance of the output's tensors: how many were merged, which were copied and
    why, and the Gram files they were merged with."""
    record = {
        "merged": sum(a == MERGE for a in actions.values()),
        "copied_from": str(inputs.template.path),
        "copied_non_float": sorted(n for n, a in actions.items() if a == NON_FLOAT),
        "copied_excluded": sorted(n for n, a in actions.items() if a == EXCLUDED),
        "note": "integer and bool tensors are never averaged: they are copied unchanged",
    }
    if inputs.grams is not None:
        record["grams"] = inputs.grams.provenance()
    return record


def merge(recipe: Recipe, *, progress: bool = True) -> MergeResult:
    """Run ``recipe``: stream the merge into a temporary output, then publish it
    atomically with its provenance. On any error nothing is left at ``output``."""
    start = time.perf_counter()
    output = Path(recipe.output)
    with open_inputs(recipe) as inputs:
        actions = plan_actions(recipe, inputs.template)
        check_memory(inputs, actions)
        tensors = tensor_record(inputs, actions)
        output.parent.mkdir(parents=True, exist_ok=True)  # only once the inputs are known good
        written = write_stream(
            output,
            recipe.to_dict(),
            input_roles(recipe, inputs),
            inputs.template,
            tensors,
            lambda order: iter_merged(recipe, inputs, order, actions=actions, progress=progress),
            hash_inputs=recipe.hash_inputs,
            shard_size=recipe.shard_size,
        )
    copied = len(actions) - tensors["merged"]
    summary = f"{tensors['merged']} tensors merged by {recipe.method}, {copied} copied"
    return MergeResult.of_stream(output, written, tensors, actions, start, summary)
