"""The merge recipe: one YAML format for every checkpoint kind and both toolkits.

.. code-block:: yaml

    method: ties
    base_model: generalist.safetensors
    models:
      - {model: expert_noise.safetensors, weight: 1.0}
      - {model: expert_phone.safetensors, weight: 1.0}
    parameters: {lambda: 1.0, density: 0.2, trim_scope: tensor}
    exclude: ["*.num_batches_tracked"]
    overrides:
      - {pattern: "encoder.*", parameters: {lambda: 0.5}}
    output: merged.safetensors

Relative paths are taken relative to the working directory, as mergekit and NeMo's
scripts do. ``key=value`` overrides (``parameters.density=0.3``, ``models.1.weight=2``)
are applied before validation.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from merge_core.errors import RecipeError
from merge_core.recipes.config import load_yaml_config
from merge_core.recipes.validate import (
    boolean,
    choice,
    density,
    density_and_epsilon,
    density_and_gamma,
    flag,
    integer,
    known_keys,
    number,
    pathname,
    unit_interval,
    weight,
)
from merge_core.registry import MergeMethod, get_method

if TYPE_CHECKING:
    from merge_core.engine import MergeResult

# the per-tensor methods' parameters, whichever method takes them
PARAMETER_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "lambda": number,
    "density": density,
    "seed": integer,
    "trim_scope": choice("tensor", "model"),
    "t": unit_interval,
    "mode": choice("max", "min"),
    "alpha": number,
    "common_fraction": density,
    "gamma": unit_interval,
    "epsilon": unit_interval,
    "filter_wise": boolean,
}

# constraints between parameters, checked wherever the keys meet: (params, where) -> None
PARAMETER_RELATIONS: tuple[Callable[[Mapping[str, Any], str], None], ...] = (density_and_gamma, density_and_epsilon)


def check_relations(params: Mapping[str, Any], where: str) -> None:
    """Raise a RecipeError naming ``where`` if ``params`` break a :data:`PARAMETER_RELATIONS` rule."""
    for relation in PARAMETER_RELATIONS:
        relation(params, where)


@dataclass(frozen=True)
class ModelEntry:
    """One merged member: a checkpoint path and its weight w_i."""

    model: str
    weight: float = 1.0


@dataclass(frozen=True)
class Override:
    """Parameters for the tensors whose names match a glob ``pattern``."""

    pattern: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Build it with :func:`load_recipe` or :meth:`from_mapping`."""

    method: str
    models: tuple[ModelEntry, ...]
    output: str
    base_model: str | None = None
    include_base: bool = False
    base_weight: float = 1.0
    parameters: Mapping[str, Any] = field(default_factory=dict)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    allow_nonfinite: bool = False
    shard_size: int | None = None
    hash_inputs: bool = True

    @property
    def merge_method(self) -> MergeMethod:
        return get_method(self.method)

    def selects(self, name: str) -> bool:
        """True when the tensor is merged rather than copied from the base."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )

    def parameters_for(self, name: str) -> dict[str, Any]:
        """The method's parameters for one tensor: defaults, then ``parameters``, then
        every matching override in recipe order (later overrides win)."""
        params = {**self.merge_method.defaults, **self.parameters}
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.pattern):
                params.update(o.parameters)
        # overrides that only meet on some tensors are checked here, on those tensors
        check_relations(params, f"parameters of tensor {name!r}")
        return params

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as stored in provenance records."""
        return {
            "method": self.method,
            "base_model": self.base_model,
            "models": [{"model": m.model, "weight": m.weight} for m in self.models],
            "include_base": self.include_base,
            "base_weight": self.base_weight,
            "parameters": dict(self.parameters),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "overrides": [{"pattern": o.pattern, "parameters": dict(o.parameters)} for o in self.overrides],
            "output": self.output,
            "allow_nonfinite": self.allow_nonfinite,
            "shard_size": self.shard_size,
            "hash_inputs": self.hash_inputs,
        }

    def run(self, *, progress: bool = True) -> MergeResult:
        """Stream the merge into ``output`` (:func:`merge_core.engine.merge`)."""
        from merge_core.engine import merge

        return merge(self, progress=progress)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | DictConfig) -> "Recipe":
        """Validate a recipe given as a mapping (parsed YAML or a Hydra config)."""
        if isinstance(raw, DictConfig):
            raw = OmegaConf.to_container(raw, resolve=True)
        if not isinstance(raw, Mapping):
            raise RecipeError(f"a recipe must be a mapping of keys, got {type(raw).__name__}")
        known_keys(raw, RECIPE_KEYS)
        for key in ("method", "models", "output"):
            if raw.get(key) in (None, "", []):
                raise RecipeError(f"recipe key {key!r} is required")

        method = get_method(str(raw["method"]))
        recipe = cls(
            method=method.name,
            models=_model_entries(raw["models"]),
            output=pathname("output", raw["output"]),
            base_model=None if raw.get("base_model") is None else pathname("base_model", raw["base_model"]),
            include_base=flag(raw, "include_base"),
            base_weight=weight("base_weight", raw.get("base_weight", 1.0)),
            parameters=_checked_parameters(method, raw.get("parameters") or {}, "parameters"),
            include=_patterns(raw, "include", ("*",)),
            exclude=_patterns(raw, "exclude", ()),
            overrides=_overrides(method, raw.get("overrides") or []),
            allow_nonfinite=flag(raw, "allow_nonfinite"),
            shard_size=_size(raw.get("shard_size")),
            hash_inputs=flag(raw, "hash_inputs", default=True),
        )
        _check_against_method(recipe, method)
        _check_parameter_relations(recipe)
        return recipe


RECIPE_KEYS = frozenset({
    "method",
    "base_model",
    "models",
    "include_base",
    "base_weight",
    "parameters",
    "include",
    "exclude",
    "overrides",
    "output",
    "allow_nonfinite",
    "shard_size",
    "hash_inputs",
})


def _model_entries(raw: Any) -> tuple[ModelEntry, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise RecipeError("recipe key 'models' must be a list of {model: PATH, weight: W} entries")
    entries = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, Mapping) or not item.get("model"):
            raise RecipeError(f"models[{i}] must be a path or a mapping with a 'model' key, got {item!r}")
        extra = sorted(set(item) - {"model", "weight"})
        if extra:
            raise RecipeError(f"models[{i}] has unknown key(s) {extra}; allowed: model, weight")
        model = pathname(f"models[{i}].model", item["model"])
        entries.append(ModelEntry(model, weight(f"models[{i}].weight", item.get("weight", 1.0))))
    return tuple(entries)


def _checked_parameters(method: MergeMethod, raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where} must be a mapping, got {raw!r}")
    unknown = sorted(map(str, set(raw) - set(method.defaults)))
    if unknown:
        accepted = ", ".join(sorted(method.defaults)) or "none"
        raise RecipeError(f"{where}: method {method.name!r} takes no parameter(s) {unknown}; it accepts: {accepted}")
    return {key: (method.checks.get(key) or PARAMETER_CHECKS[key])(key, value) for key, value in raw.items()}


def _check_parameter_relations(recipe: Recipe) -> None:
    """The relations of the recipe's parameters, alone and under each override, before any
    tensor is read (two overrides that meet on a tensor: :meth:`Recipe.parameters_for`)."""
    params = {**recipe.merge_method.defaults, **recipe.parameters}
    check_relations(params, "parameters")
    for i, o in enumerate(recipe.overrides):
        check_relations({**params, **o.parameters}, f"overrides[{i}].parameters")


def _patterns(raw: Mapping[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise RecipeError(f"recipe key {key!r} must be a list of glob patterns, got {value!r}")
    return tuple(value)


def _overrides(method: MergeMethod, raw: Any) -> tuple[Override, ...]:
    if not isinstance(raw, (list, tuple)):
        raise RecipeError(f"recipe key 'overrides' must be a list of {{pattern, parameters}} entries, got {raw!r}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not isinstance(item.get("pattern"), str):
            raise RecipeError(f"overrides[{i}] must be a mapping with a 'pattern' and 'parameters', got {item!r}")
        params = _checked_parameters(method, item.get("parameters") or {}, f"overrides[{i}].parameters")
        if "trim_scope" in params:
            raise RecipeError(f"overrides[{i}]: trim_scope applies to the whole merge and cannot vary per pattern")
        out.append(Override(item["pattern"], params))
    return tuple(out)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(value: Any) -> int | None:
    """``shard_size``: bytes as an integer or a string such as ``256MiB``, ``2GB``."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGIB")
    unit = text[len(number) :]
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except (ValueError, KeyError, OverflowError):  # OverflowError: inf
        raise RecipeError(f"shard_size must be a byte count such as 268435456 or '256MiB', got {value!r}") from None
    if size <= 0:
        raise RecipeError(f"shard_size must be positive, got {value!r}")
    return size


def _check_against_method(recipe: Recipe, method: MergeMethod) -> None:
    members = len(recipe.models) + (1 if recipe.include_base else 0)
    if members < method.min_models or (method.max_models is not None and members > method.max_models):
        wanted = str(method.min_models)
        if method.max_models != method.min_models:
            wanted = f"at least {method.min_models}" if method.max_models is None else f"{method.min_models}-{method.max_models}"
        raise RecipeError(f"method {method.name!r} merges {wanted} model(s); the recipe gives {members}")
    if method.needs_base and recipe.base_model is None:
        raise RecipeError(f"method {method.name!r} needs 'base_model' (task vectors are taken against it)")
    if recipe.include_base:
        if not method.base_as_member:
            raise RecipeError(f"include_base is not meaningful for method {method.name!r} (its task vector is zero)")
        if recipe.base_model is None:
            raise RecipeError("include_base: true needs 'base_model'")
    if not method.uses_weights and any(m.weight != 1.0 for m in recipe.models):
        raise RecipeError(f"method {method.name!r} does not use weights; remove them from 'models'")
    total = sum(m.weight for m in recipe.models) + (recipe.base_weight if recipe.include_base else 0.0)
    if method.uses_weights and total <= 0:
        raise RecipeError("the model weights sum to zero; give at least one member a positive weight")
    output = Path(recipe.output).resolve()
    for path in [recipe.base_model, *(m.model for m in recipe.models)]:
        if path is not None and Path(path).resolve() == output:
            raise RecipeError(f"output {recipe.output!r} is also an input; inputs are never overwritten")


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a per-tensor method's recipe YAML, apply ``key=value`` overrides, validate
    (errors name the file). Recipes of any kind: :func:`merge_core.recipes.run_recipe`."""
    config = load_yaml_config(path, overrides)
    try:
        return Recipe.from_mapping(config)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
