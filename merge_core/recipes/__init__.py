"""The front door: every recipe, of every kind, is read once, validated once and run here.

.. code-block:: python

    from merge_core.recipes import run_recipe

    result = run_recipe("configs/recipes/example_ties.yaml", ["parameters.density=0.3"])

A recipe's ``method`` names its kind in :mod:`merge_core.registry`: a per-tensor method
(``average``, ``ties``, ...: :class:`~merge_core.recipes.merge.Recipe`, run by the streaming
engine) or a whole-model procedure with a schema of its own (``greedy_soup``, ``mam``,
``mact``). ``asr-merge merge``, ``select`` and ``mact`` and the toolkits' own merge
scripts all come through :func:`run_recipe`; ``select`` and ``mact`` imply their method
when the recipe does not name one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from omegaconf import DictConfig, OmegaConf

from merge_core.errors import RecipeError
from merge_core.recipes.config import apply_overrides, load_yaml_config
from merge_core.registry import get_recipe_kind

if TYPE_CHECKING:
    from merge_core.engine import MergeResult

Source = str | Path | Mapping[str, Any] | DictConfig


class RunnableRecipe(Protocol):
    """What every recipe kind's validated recipe offers."""

    method: str

    def run(self, *, progress: bool = True) -> MergeResult:
        """Run the recipe: what it wrote."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as stored in provenance records."""


def load_recipe_config(source: Source, overrides: Sequence[str] = ()) -> DictConfig:
    """The recipe as a config with ``key=value`` overrides applied: a YAML file is read
    (once), a mapping or Hydra config is taken as it is."""
    if isinstance(source, (str, Path)):
        return load_yaml_config(source, overrides)
    config = source if isinstance(source, DictConfig) else OmegaConf.create(dict(source))
    return apply_overrides(config, overrides)


def parse_recipe(config: Mapping[str, Any] | DictConfig, *, method: str | None = None, where: str | None = None) -> RunnableRecipe:
    """Validate ``config`` as the recipe kind its ``method`` names (``method``: the kind
    a command implies, used when the recipe names none). Errors start with ``where``."""
    raw = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    try:
        if not isinstance(raw, dict):
            raise RecipeError(f"a recipe must be a mapping of keys, got {type(raw).__name__}")
        named = raw.get("method")
        if method is not None and named not in (None, method):
            raise RecipeError(f"this command runs method: {method} recipes; the recipe has method: {named}")
        if named is None:
            if method is None:
                raise RecipeError("recipe key 'method' is required")
            raw["method"] = method
        kind = get_recipe_kind(str(raw["method"]))
        if kind is None:
            from merge_core.recipes.merge import Recipe

            return Recipe.from_mapping(raw)
        return kind.recipe.from_mapping(raw)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}" if where else str(e)) from None


def run_recipe(source: Source, overrides: Sequence[str] = (), *, method: str | None = None, progress: bool = True) -> MergeResult:
    """Read, validate and run a recipe of any kind; returns its :class:`~merge_core.engine.MergeResult`."""
    where = str(source) if isinstance(source, (str, Path)) else None
    recipe = parse_recipe(load_recipe_config(source, overrides), method=method, where=where)
    return recipe.run(progress=progress)


# the built-in recipe kinds register themselves, in the order `asr-merge methods` lists them
from merge_core.recipes import mam, greedy_soup, mact, search  # noqa: E402,F401
