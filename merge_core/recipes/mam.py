"""Multimodal attention merging (MAM): source attention into a target model.

Sundar et al., "Multimodal Attention Merging for Improved Speech Recognition and Audio Event Classification".

The source (e.g. text BERT) and the target (e.g. speech HuBERT, a NeMo Conformer) are
different architectures, so the engine's one-key-set rule cannot hold; this module
streams its own merge over the same readers, writers, provenance and atomic publishing.
Only the mapped attention projections change; every other target tensor is copied.

.. code-block:: yaml

    method: mam
    target_model: hubert_ctc.safetensors   # M_t: names, shapes, dtypes and the rest of the output
    source_model: bert.safetensors         # M_s: only its mapped tensors are read
    name_map: bert_to_hubert               # or bert_to_nemo_conformer, or {source_pattern: target_pattern} with {i}
    layers: [12, 13, 14]                   # Eq. 2's subset l; null (default): every mapped layer
    parameters:
      lambda: 0.25                         # one value, a list (one per layer) or {layer: value}, each in [0, 1]
      baseline: none                       # none | noise_source | noise_target (Table 1's N(Source), N(Target))
      seed: 0                              # noise baselines only
    output: merged.safetensors
    hash_inputs: true                      # record inputs' SHA-256 (false: sizes only)

``lambda`` as a list gives layer i the i-th value; as a mapping it merges only the
listed layers (lambda = 0 elsewhere, Eq. 2). ``layers`` restricts either further.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from merge_core.checkpoint import CheckpointReader, open_checkpoint
from merge_core.engine import MergeResult, write_stream
from merge_core.errors import RecipeError, TensorMismatchError
from merge_core.attention.interpolation import BASELINES, interpolate
from merge_core.attention.name_map import MappedTensor, map_tensors, resolve_name_map
from merge_core.recipes.validate import choice, integer, known_keys, pathname, unit_interval
from merge_core.registry import recipe_kind

METHOD = "mam"
DEFAULTS: Mapping[str, Any] = {"lambda": 0.5, "baseline": "none", "seed": 0}
RECIPE_KEYS = frozenset({"method", "target_model", "source_model", "name_map", "layers", "parameters", "output", "hash_inputs"})

Lambda = float | list[float] | dict[int, float]


def _lambda(key: str, value: Any) -> Lambda:
    """One lambda, a per-layer list, or a ``{layer: lambda}`` mapping, each in [0, 1]."""
    if isinstance(value, Mapping):
        return {_layer_index(key, k): unit_interval(f"{key}[{k}]", v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [unit_interval(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return unit_interval(key, value)


def _layer_index(where: str, value: Any) -> int:
    if isinstance(value, str) and value.isdigit():  # YAML mapping keys may arrive as strings
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecipeError(f"{where}: layer indices must be integers >= 0, got {value!r}")
    return value


_PARAMETER_CHECKS = {"lambda": _lambda, "baseline": choice(*BASELINES), "seed": integer}


def _parameters(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise RecipeError(f"parameters must be a mapping, got {raw!r}")
    unknown = sorted(map(str, set(raw) - set(DEFAULTS)))
    if unknown:
        raise RecipeError(f"parameters: method 'mam' takes no parameter(s) {unknown}; it accepts: {', '.join(DEFAULTS)}")
    return {**DEFAULTS, **{key: _PARAMETER_CHECKS[key](key, value) for key, value in raw.items()}}


@recipe_kind(METHOD, defaults=DEFAULTS, about="own recipe keys: see merge_core.recipes.mam")
@dataclass(frozen=True)
class MamRecipe:
    """A validated ``method: mam`` recipe; build it with :meth:`from_mapping`."""

    target_model: str
    source_model: str
    name_map: str | Mapping[str, str]
    output: str
    layers: tuple[int, ...] | None = None
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULTS))
    hash_inputs: bool = True
    method: str = METHOD

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as stored in provenance records."""
        return {
            "method": self.method,
            "target_model": self.target_model,
            "source_model": self.source_model,
            "name_map": self.name_map if isinstance(self.name_map, str) else dict(self.name_map),
            "layers": None if self.layers is None else list(self.layers),
            "parameters": dict(self.parameters),
            "output": self.output,
            "hash_inputs": self.hash_inputs,
        }

    def run(self, *, progress: bool = True) -> MergeResult:
        """:func:`run_mam` (one pass over the target's tensors: no progress bar)."""
        return run_mam(self)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | DictConfig) -> "MamRecipe":
        """Validate a recipe given as a mapping (parsed YAML or a Hydra config)."""
        if isinstance(raw, DictConfig):
            raw = OmegaConf.to_container(raw, resolve=True)
        known_keys(raw, RECIPE_KEYS, "mam recipe")
        for key in ("target_model", "source_model", "name_map", "output"):
            if raw.get(key) in (None, "", {}):
                raise RecipeError(f"mam recipe key {key!r} is required")
        if raw.get("method") != METHOD:
            raise RecipeError(f"a mam recipe has method: mam, got {raw.get('method')!r}")
        hash_inputs = raw.get("hash_inputs", True)
        if not isinstance(hash_inputs, bool):
            raise RecipeError(f"recipe key 'hash_inputs' must be true or false, got {hash_inputs!r}")
        recipe = cls(
            target_model=pathname("target_model", raw["target_model"]),
            source_model=pathname("source_model", raw["source_model"]),
            name_map=raw["name_map"],
            output=pathname("output", raw["output"]),
            layers=_layers(raw.get("layers")),
            parameters=_parameters(raw.get("parameters") or {}),
            hash_inputs=hash_inputs,
        )
        resolve_name_map(recipe.name_map)  # fail on a bad map before any file is opened
        _check_output_is_new(recipe)
        return recipe


def _layers(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise RecipeError(f"recipe key 'layers' must be a non-empty list of layer indices or null, got {value!r}")
    return tuple(sorted({_layer_index("layers", v) for v in value}))


def _check_output_is_new(recipe: MamRecipe) -> None:
    output = Path(recipe.output).resolve()
    for path in (recipe.target_model, recipe.source_model):
        if Path(path).resolve() == output:
            raise RecipeError(f"output {recipe.output!r} is also an input; inputs are never overwritten")


def layer_lambdas(recipe: MamRecipe, model_layers: list[int]) -> dict[int, float]:
    """lambda_i for each merged layer i (Eqs. 1-2); layers left out keep the target's weights."""
    value = recipe.parameters["lambda"]
    if isinstance(value, list):
        if len(value) != len(model_layers):
            raise RecipeError(f"parameters.lambda lists {len(value)} values; the target has {len(model_layers)} mapped layers")
        lambdas = dict(zip(model_layers, value))
    elif isinstance(value, dict):
        lambdas = dict(value)
    else:
        lambdas = {layer: value for layer in model_layers}
    wanted = recipe.layers if recipe.layers is not None else sorted(lambdas)
    missing = [layer for layer in wanted if layer not in model_layers or layer not in lambdas]
    if missing:
        raise RecipeError(
            f"layer(s) {missing} are not both mapped in the target (layers {model_layers}) and given a lambda"
        )
    return {layer: lambdas[layer] for layer in wanted}


def _check_pair(source: CheckpointReader, target: CheckpointReader, pair: MappedTensor) -> None:
    s, t = source.spec(pair.source), target.spec(pair.target)
    if s.shape != t.shape:
        raise TensorMismatchError(
            f"source {source.path} tensor {pair.source!r} has shape {s.shape}, "
            f"target {target.path} tensor {pair.target!r} has {t.shape}"
        )
    if not (s.dtype.is_floating_point and t.dtype.is_floating_point):
        raise TensorMismatchError(
            f"source tensor {pair.source!r} ({s.dtype}) and target tensor {pair.target!r} ({t.dtype}) "
            "must both be floating point to be interpolated"
        )


@dataclass
class MamInputs:
    """The open target and source checkpoints and the merged tensors with their lambdas."""

    target: CheckpointReader
    source: CheckpointReader
    merged: dict[str, tuple[MappedTensor, float]]


@contextlib.contextmanager
def open_mam_inputs(recipe: MamRecipe) -> Iterator[MamInputs]:
    """Open both checkpoints, map names, pick layers and check shapes before anything is written."""
    with open_checkpoint(recipe.target_model) as target, open_checkpoint(recipe.source_model) as source:
        pairs = map_tensors(
            resolve_name_map(recipe.name_map),
            source.keys(),
            target.keys(),
            f"source {source.path}",
            f"target {target.path}",
        )
        lambdas = layer_lambdas(recipe, sorted({p.layer for p in pairs}))
        merged = {p.target: (p, lambdas[p.layer]) for p in pairs if p.layer in lambdas}
        for pair, _ in merged.values():
            _check_pair(source, target, pair)
        yield MamInputs(target, source, merged)


def iter_mam(recipe: MamRecipe, inputs: MamInputs, order: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in ``order``: mapped tensors interpolated, the rest the target's."""
    for name in order:
        if name not in inputs.merged:
            yield name, inputs.target.get(name)
            continue
        pair, lam = inputs.merged[name]
        yield name, interpolate(pair, inputs.source.get(pair.source), inputs.target.get(name), lam, recipe.parameters)


def _tensor_record(inputs: MamInputs) -> dict[str, Any]:
    return {
        "merged": len(inputs.merged),
        "pairs": {name: {"source": pair.source, "layer": pair.layer, "lambda": lam} for name, (pair, lam) in inputs.merged.items()},
        "copied_from": str(inputs.target.path),
    }


def run_mam(recipe: MamRecipe) -> MergeResult:
    """Run a MAM recipe: stream into a temporary output, publish it atomically with
    its provenance. On any error nothing is left at ``output``."""
    start = time.perf_counter()
    output = Path(recipe.output)
    with open_mam_inputs(recipe) as inputs:
        tensors = _tensor_record(inputs)
        output.parent.mkdir(parents=True, exist_ok=True)  # only once the inputs are known good
        files, record = write_stream(
            output,
            recipe.to_dict(),
            [("target", inputs.target, None), ("source", inputs.source, None)],
            inputs.target,
            tensors,
            lambda order: iter_mam(recipe, inputs, order),
            hash_inputs=recipe.hash_inputs,
        )
        copied = len(inputs.target.keys()) - len(inputs.merged)
    return MergeResult(
        output=output,
        files=files,
        merged=len(inputs.merged),
        copied=copied,
        seconds=time.perf_counter() - start,
        provenance=record,
        summary=f"{len(inputs.merged)} tensors merged by {METHOD}, {copied} copied",
    )
