"""Name maps between the attention projections of two architectures (for MAM and L-MAM).

A name map is a mapping ``{source_pattern: target_pattern}``; ``{i}`` in a pattern
stands for the layer index. A pattern matches a tensor name that equals it, or ends
with it after a dotted prefix, so one map serves ``BertModel`` (``encoder.layer...``)
and ``BertForMaskedLM`` (``bert.encoder.layer...``), ``HubertModel`` and
``HubertForCTC`` (``hubert.encoder.layers...``) and wav2vec2 alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from merge_core.errors import RecipeError, TensorMismatchError

_PROJECTIONS = ("q", "k", "v")
_BERT = {"q": "query", "k": "key", "v": "value"}
_PARAMS = ("weight", "bias")

BUILTIN_MAPS: dict[str, dict[str, str]] = {
    # Hugging Face BERT -> HuBERT / wav2vec2 (both name their encoder layers alike)
    "bert_to_hubert": {
        f"encoder.layer.{{i}}.attention.self.{_BERT[p]}.{w}": f"encoder.layers.{{i}}.attention.{p}_proj.{w}"
        for p in _PROJECTIONS
        for w in _PARAMS
    },
    # Hugging Face BERT -> NeMo Conformer / FastConformer encoder
    "bert_to_nemo_conformer": {
        f"encoder.layer.{{i}}.attention.self.{_BERT[p]}.{w}": f"encoder.layers.{{i}}.self_attn.linear_{p}.{w}"
        for p in _PROJECTIONS
        for w in _PARAMS
    },
}


@dataclass(frozen=True)
class MappedTensor:
    """One target tensor merged with one source tensor, in layer ``layer``."""

    target: str
    source: str
    layer: int


def resolve_name_map(name_map: str | Mapping[str, str]) -> dict[str, str]:
    """A built-in map's patterns by name, or a user map checked for ``{i}`` in both sides."""
    if isinstance(name_map, str):
        if name_map not in BUILTIN_MAPS:
            raise RecipeError(f"unknown name_map {name_map!r}; built-in maps: {', '.join(sorted(BUILTIN_MAPS))}")
        return BUILTIN_MAPS[name_map]
    if not isinstance(name_map, Mapping) or not name_map:
        raise RecipeError(f"name_map must be a built-in map's name or a non-empty {{source: target}} mapping, got {name_map!r}")
    for source, target in name_map.items():
        if not isinstance(source, str) or not isinstance(target, str) or "{i}" not in source or "{i}" not in target:
            raise RecipeError(f"name_map entry {source!r}: {target!r} must map a string pattern to one, each with '{{i}}'")
    return dict(name_map)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # any dotted prefix, then the pattern with {i} as the captured layer index
    body = r"(?P<i>\d+)".join(re.escape(part) for part in pattern.split("{i}"))
    return re.compile(rf"(?:.+\.)?{body}")


def _matches_by_layer(pattern: str, keys: Sequence[str], where: str) -> dict[int, str]:
    """``{layer: key}`` for the keys matching ``pattern``; two keys for one layer is an error."""
    regex = _pattern_regex(pattern)
    found: dict[int, str] = {}
    for key in keys:
        match = regex.fullmatch(key)
        if match is None:
            continue
        layer = int(match.group("i"))
        if layer in found:
            raise TensorMismatchError(f"{where}: {found[layer]!r} and {key!r} both match {pattern!r} for layer {layer}")
        found[layer] = key
    return found


def map_tensors(
    patterns: Mapping[str, str], source_keys: Sequence[str], target_keys: Sequence[str], source: str, target: str
) -> list[MappedTensor]:
    """Pair every target tensor a pattern matches with the source tensor of the same layer.

    ``source`` and ``target`` name the two checkpoints in errors. A target layer
    without its source counterpart is an error naming both tensors, since MAM needs
    the same layers on both sides; a map that matches nothing in the target is too.
    """
    pairs = []
    for source_pattern, target_pattern in patterns.items():
        targets = _matches_by_layer(target_pattern, target_keys, target)
        sources = _matches_by_layer(source_pattern, source_keys, source)
        for layer, target_key in sorted(targets.items()):
            if layer not in sources:
                wanted = source_pattern.replace("{i}", str(layer))
                raise TensorMismatchError(
                    f"{target}: tensor {target_key!r} maps to {wanted!r}, which {source} does not have"
                )
            pairs.append(MappedTensor(target_key, sources[layer], layer))
    if not pairs:
        raise TensorMismatchError(f"{target}: no tensor matches the name map's target patterns {sorted(patterns.values())}")
    return pairs
