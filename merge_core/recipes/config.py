"""Reading a YAML config (a recipe, an evaluation config) once, with ``key=value`` overrides.

Overrides follow Hydra's command-line grammar where it matters to users: dotted keys
and list indices (``models.0.weight=2``), values parsed as YAML, and a leading ``+``
accepted (a key absent from the file is added either way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from merge_core.errors import RecipeError


def apply_overrides(config: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply ``key=value`` overrides (values parsed as YAML; dotted keys and list
    indices such as ``models.0.weight`` allowed)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} is not of the form key=value")
        try:
            OmegaConf.update(config, key.lstrip("+"), yaml.safe_load(value), merge=True, force_add=True)
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise RecipeError(f"cannot apply override {item!r}: {e}") from None
    return config


def load_yaml_config(path: str | Path, overrides: Sequence[str] = (), what: str = "recipe") -> DictConfig:
    """Read a YAML mapping (a recipe, an evaluation config) and apply ``key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{what} file {str(path)!r} not found")
    try:
        config = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: not a valid YAML {what}: {e}") from None
    if not isinstance(config, DictConfig):
        raise RecipeError(f"{path}: a {what} must be a mapping of keys")
    return apply_overrides(config, overrides)
