"""Checks shared by every recipe kind: each takes the key (for the message) and the
value, and returns the value validated or raises :class:`~merge_core.errors.RecipeError`
naming the key.

>>> density("parameters.density", 0.3)
0.3
>>> choice("given", "by_dev_wer")("order", "given")
'given'
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

from merge_core.errors import RecipeError


def number(key: str, value: Any) -> float:
    """A finite int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"parameter {key!r} must be a finite number, got {value!r}")
    return float(value)


def density(key: str, value: Any) -> float:
    """A fraction of entries kept: in (0, 1]."""
    value = number(key, value)
    if not 0.0 < value <= 1.0:
        raise RecipeError(f"parameter {key!r} must lie in (0, 1], got {value}")
    return value


def unit_interval(key: str, value: Any) -> float:
    """A number in [0, 1]."""
    value = number(key, value)
    if not 0.0 <= value <= 1.0:
        raise RecipeError(f"parameter {key!r} must lie in [0, 1], got {value}")
    return value


def integer(key: str, value: Any) -> int:
    """An int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError(f"parameter {key!r} must be an integer, got {value!r}")
    return value


def boolean(key: str, value: Any) -> bool:
    """true or false."""
    if not isinstance(value, bool):
        raise RecipeError(f"parameter {key!r} must be true or false, got {value!r}")
    return value


def density_and_gamma(params: Mapping[str, Any], where: str) -> None:
    """Model Breadcrumbs drops the ``gamma`` largest and keeps ``density`` below them:
    the two fractions cannot add up to more than the whole tensor."""
    if "density" in params and "gamma" in params and params["density"] + params["gamma"] > 1.0:
        raise RecipeError(
            f"{where}: density + gamma must not exceed 1 (density keeps, gamma drops the largest), "
            f"got density {params['density']} + gamma {params['gamma']}"
        )


def density_and_epsilon(params: Mapping[str, Any], where: str) -> None:
    """DELLA's keep probabilities span density -/+ epsilon: they must stay in (0, 1]."""
    if "density" in params and "epsilon" in params:
        low, high = params["density"] - params["epsilon"], params["density"] + params["epsilon"]
        if low <= 0.0 or high > 1.0:
            raise RecipeError(
                f"{where}: keep probabilities density -/+ epsilon must lie in (0, 1], got "
                f"density {params['density']}, epsilon {params['epsilon']} ({low:g} to {high:g})"
            )


def choice(*choices: str) -> Callable[[str, Any], str]:
    """A check that the value is one of ``choices``."""

    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise RecipeError(f"parameter {key!r} must be one of {', '.join(choices)}; got {value!r}")
        return value

    return check


def flag(raw: Mapping[str, Any], key: str, default: bool = False) -> bool:
    """``raw[key]`` as true or false (``default`` when absent)."""
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise RecipeError(f"recipe key {key!r} must be true or false, got {value!r}")
    return value


def weight(key: str, value: Any) -> float:
    """A merge weight: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{key} must be a finite number, got {value!r}")
    if value < 0:
        raise RecipeError(f"{key} must not be negative, got {value}")
    return float(value)


def pathname(key: str, value: Any) -> str:
    """A file or folder path: a non-empty string (or path object)."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise RecipeError(f"recipe key {key!r} must be a path, got {value!r}")
    return str(value)


def known_keys(raw: Mapping[str, Any], known: set[str] | frozenset[str], what: str = "recipe") -> None:
    """Refuse keys outside ``known``, listing the known ones."""
    unknown = sorted(map(str, set(raw) - set(known)))  # YAML keys may be numbers too
    if unknown:
        raise RecipeError(f"unknown {what} key(s) {unknown}; known keys: {sorted(known)}")
