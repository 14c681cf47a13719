"""Reading a YAML config (a recipe, an evaluation config) once, with ``key=value`` overrides.

Overrides follow Hydra's command-line grammar where it matters to users: dotted keys
and list indices (``models.0.weight=2``), values parsed as YAML, and a leading ``+``
accepted (a key absent from the file is added either way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from merge_core.errors import RecipeError


# OmegaConf builds a node per value, tens of microseconds each: a bigger config is
# refused before it is built (recipes and evaluation configs hold tens of values)
MAX_CONFIG_VALUES = 20_000


def yaml_tree_problem(tree: Any, limit: int) -> str | None:
    """Why parsed YAML cannot be walked safely, or None: an alias that contains itself
    (a walk never ends), or more than ``limit`` values once aliases are expanded (a
    "billion laughs" bomb is parsed in an instant; every walk expands it). Shared
    values are sized once, so this takes time in the number of distinct values.

    >>> yaml_tree_problem(yaml.safe_load("{a: &x [1, 2], b: [*x, *x]}"), 11)
    >>> yaml_tree_problem(yaml.safe_load("{a: &x [1, 2], b: [*x, *x]}"), 5)
    'more than 5 values once its aliases are expanded'
    >>> yaml_tree_problem(yaml.safe_load("a: &x [*x]"), 10)
    'an alias to a value that contains it'
    """
    sizes: dict[int, int] = {}  # container id -> expanded size
    walking: set[int] = set()  # the containers on the path from the root
    stack: list[tuple[Any, bool]] = [(tree, False)] if isinstance(tree, (dict, list)) else []
    while stack:
        node, done = stack.pop()
        children = list(node.values()) if isinstance(node, dict) else node
        if done:
            walking.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[id(node)] > limit:
                return f"more than {limit} values once its aliases are expanded"
        elif id(node) in walking:
            return "an alias to a value that contains it"
        elif id(node) not in sizes:
            walking.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if isinstance(c, (dict, list)))
    return None


def apply_overrides(config: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply ``key=value`` overrides (values parsed as YAML; dotted keys and list
    indices such as ``models.0.weight`` allowed)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} is not of the form key=value")
        try:
            parsed = yaml.safe_load(value)
            problem = yaml_tree_problem(parsed, MAX_CONFIG_VALUES)
            if problem:
                raise RecipeError(f"cannot apply override {item!r}: its value holds {problem}")
            OmegaConf.update(config, key.lstrip("+"), parsed, merge=True, force_add=True)
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise RecipeError(f"cannot apply override {item!r}: {e}") from None
        except (IndexError, ValueError, TypeError):  # OmegaConf's key parser on keys such as "["
            raise RecipeError(f"cannot apply override {item!r}: {key!r} is not a key path such as models.0.weight") from None
        except RecursionError:
            raise RecipeError(f"cannot apply override {item!r}: its value is nested too deeply") from None
    return config


def load_yaml_config(path: str | Path, overrides: Sequence[str] = (), what: str = "recipe") -> DictConfig:
    """Read a YAML mapping (a recipe, an evaluation config) and apply ``key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{what} file {str(path)!r} not found")
    try:
        # parsed twice: checked as plain YAML before OmegaConf (whose loader types
        # scalars its own way) builds its nodes
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(tree, dict):
            found = "nothing" if tree is None else type(tree).__name__
            raise RecipeError(f"{path}: a {what} must be a mapping of keys, got {found}")
        problem = yaml_tree_problem(tree, MAX_CONFIG_VALUES)
        if problem:
            raise RecipeError(f"{path}: a {what} with {problem} is refused")
        config = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not a valid YAML {what}: {e}") from None
    except RecursionError:
        raise RecipeError(f"{path}: not a valid YAML {what}: nested too deeply") from None
    try:
        return apply_overrides(config, overrides)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
