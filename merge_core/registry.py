"""The one registry of merge methods, filled by the :func:`merge_method` decorator.

A method is a small pure function ``fn(t: TensorInputs, p: Mapping) -> Tensor`` that
merges one tensor. The streaming engine calls it once per selected tensor name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import torch

from merge_core.errors import RecipeError


@dataclass
class TensorInputs:
    """Everything a method sees for one tensor name, already in the compute dtype.

    ``models`` are the experts theta_1..n (preceded by the base when the recipe
    sets ``include_base``), ``weights`` their weights w_i as float64, ``base`` is
    theta_0 (None when the recipe has no base model). Inputs may be read-only memory
    maps: methods must never modify them in place.
    """

    name: str
    base: torch.Tensor | None
    models: Sequence[torch.Tensor]
    weights: torch.Tensor
    trim: Callable[[torch.Tensor, int, float], torch.Tensor] | None = None


MergeFn = Callable[[TensorInputs, Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method and what it asks of a recipe."""

    name: str
    fn: MergeFn
    needs_base: bool
    base_as_member: bool
    min_models: int
    max_models: int | None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    trims: bool = False
    uses_weights: bool = True


_METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    needs_base: bool = True,
    base_as_member: bool = False,
    min_models: int = 1,
    max_models: int | None = None,
    defaults: Mapping[str, Any] | None = None,
    trims: bool = False,
    uses_weights: bool = True,
) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn`` under ``name``.

    ``base_as_member``: the recipe may add the base to the merged members
    (``include_base``). ``trims``: the method calls ``TensorInputs.trim``, so a
    model-wide ``trim_scope`` needs the engine's first pass. ``uses_weights``: False
    for methods that ignore w_i, so the recipe refuses weights other than 1.
    """

    def register(fn: MergeFn) -> MergeFn:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        _METHODS[name] = MergeMethod(
            name=name,
            fn=fn,
            needs_base=needs_base,
            base_as_member=base_as_member,
            min_models=min_models,
            max_models=max_models,
            defaults=MappingProxyType(dict(defaults or {})),
            trims=trims,
            uses_weights=uses_weights,
        )
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; the error lists the known ones."""
    import merge_core.methods  # noqa: F401  (fills the registry)

    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(available_methods())
        raise RecipeError(f"unknown merge method {name!r}; known methods: {known}") from None


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    import merge_core.methods  # noqa: F401

    return sorted(_METHODS)
