"""The one registry of what a recipe's ``method`` can name.

- **Per-tensor methods**, filled by the :func:`merge_method` decorator: a small pure
  function ``fn(t: TensorInputs, p: Mapping) -> Tensor`` that merges one tensor; the
  streaming engine calls it once per selected tensor name (:mod:`merge_core.methods`).
- **Recipe kinds**, filled by the :func:`recipe_kind` class decorator: whole-model
  procedures with a schema of their own (``greedy_soup``, ``mam``, ``mact``), each a
  recipe class with ``from_mapping`` (validation) and ``run`` (:mod:`merge_core.recipes`).

:func:`merge_core.recipes.parse_recipe` looks ``method`` up here, once.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch

from merge_core.errors import RecipeError

# imported on first lookup: they fill the registry
_BUILTIN_MODULES = ("merge_core.methods", "merge_core.recipes")


@dataclass
class TensorInputs:
    """Everything a method sees for one tensor name, already in the compute dtype.

    ``models`` are the experts theta_1..n (preceded by the base when the recipe
    sets ``include_base``), ``weights`` their weights w_i as float64, ``base`` is
    theta_0 (None when the recipe has no base model). Inputs may be read-only memory
    maps: methods must never modify them in place. ``grams``, for methods registered
    with ``needs_grams``: each member's Gram matrix of this weight's layer inputs, in the
    order of ``models``, or None when the tensor has none (not a linear layer's weight).
    """

    name: str
    base: torch.Tensor | None
    models: Sequence[torch.Tensor]
    weights: torch.Tensor
    trim: Callable[[torch.Tensor, int, float], torch.Tensor] | None = None
    grams: Sequence[torch.Tensor] | None = None


MergeFn = Callable[[TensorInputs, Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered per-tensor method and what it asks of a recipe."""

    name: str
    fn: MergeFn
    needs_base: bool
    base_as_member: bool
    min_models: int
    max_models: int | None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    trims: bool = False
    uses_weights: bool = True
    needs_grams: bool = False
    checks: Mapping[str, Callable[[str, Any], Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class RecipeKind:
    """A registered whole-model procedure: its recipe class and what ``asr-merge methods`` shows."""

    name: str
    recipe: type
    defaults: Mapping[str, Any]
    about: str
    listed: bool  # a merge method of ``asr-merge merge`` (MAcT trains first: it has its own command)


_METHODS: dict[str, MergeMethod] = {}
_KINDS: dict[str, RecipeKind] = {}
_loaded = False


def _check_new(name: str) -> None:
    if name in _METHODS or name in _KINDS:
        raise ValueError(f"merge method {name!r} is registered twice")


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
    needs_grams: bool = False,
    checks: Mapping[str, Callable[[str, Any], Any]] | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Register the per-tensor method ``fn`` under ``name``.

    ``base_as_member``: the recipe may add the base to the merged members
    (``include_base``). ``trims``: the method calls ``TensorInputs.trim``, so a
    model-wide ``trim_scope`` needs the engine's first pass. ``uses_weights``: False
    for methods that ignore w_i, so the recipe refuses weights other than 1.
    ``needs_grams``: the engine opens each member's Gram file (:mod:`merge_core.grams`)
    and hands the method ``TensorInputs.grams``. ``checks``: this method's own checks of
    parameters whose range differs from other methods' of the same name
    (``PARAMETER_CHECKS`` otherwise).
    """

    def register(fn: MergeFn) -> MergeFn:
        _check_new(name)
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
            needs_grams=needs_grams,
            checks=MappingProxyType(dict(checks or {})),
        )
        return fn

    return register


RecipeClass = TypeVar("RecipeClass", bound=type)


def recipe_kind(
    name: str, *, defaults: Mapping[str, Any], about: str, listed: bool = True
) -> Callable[[RecipeClass], RecipeClass]:
    """Register a whole-model procedure's recipe class under ``name``. The class has
    ``from_mapping(raw)``, which validates a recipe of this kind, and its instances
    ``run(progress=...) -> MergeResult``."""

    def register(cls: RecipeClass) -> RecipeClass:
        _check_new(name)
        _KINDS[name] = RecipeKind(name, cls, MappingProxyType(dict(defaults)), about, listed)
        return cls

    return register


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def _unknown(name: str) -> RecipeError:
    known = ", ".join(available_methods() + [k for k in _KINDS if _KINDS[k].listed])
    return RecipeError(f"unknown merge method {name!r}; known methods: {known}")


def get_method(name: str) -> MergeMethod:
    """The per-tensor method registered as ``name``; the error lists the known ones."""
    _load_builtins()
    if name in _KINDS:
        raise RecipeError(f"{name!r} is a whole-model procedure, not a per-tensor method: run its recipe with run_recipe")
    try:
        return _METHODS[name]
    except KeyError:
        raise _unknown(name) from None


def get_recipe_kind(name: str) -> RecipeKind | None:
    """The whole-model procedure registered as ``name``, or None for a per-tensor method
    (whose recipe the engine runs); an unknown name is an error listing the known ones."""
    _load_builtins()
    if name in _KINDS:
        return _KINDS[name]
    if name not in _METHODS:
        raise _unknown(name)
    return None


def available_methods() -> list[str]:
    """Names of every per-tensor method, sorted."""
    _load_builtins()
    return sorted(_METHODS)


def recipe_kinds() -> list[RecipeKind]:
    """Every whole-model procedure, in registration order."""
    _load_builtins()
    return list(_KINDS.values())
