"""SpeechBrain-style command lines for the adapter's scripts: ``CONFIG.yaml --key=value ...``."""

from __future__ import annotations

import json
from typing import Any, Sequence

import yaml

from merge_core.errors import RecipeError


def overrides_as_items(overrides: str) -> list[str]:
    """SpeechBrain's overrides (``parse_arguments`` turns ``--key=value`` into YAML
    lines) as the ``key=value`` items :func:`merge_core.recipes.merge.apply_overrides` takes.
    Values are re-encoded as JSON, which YAML reads back unchanged.

    >>> overrides_as_items("parameters.density: 0.3\\nexclude: [normalizer.*]")
    ['parameters.density=0.3', 'exclude=["normalizer.*"]']
    >>> overrides_as_items("")
    []
    """
    try:
        parsed = yaml.safe_load(overrides) if overrides.strip() else {}
    except yaml.YAMLError as e:
        raise RecipeError(f"command-line overrides are not valid YAML ({e})") from None
    if not isinstance(parsed, dict):
        raise RecipeError(f"command-line overrides must be --key=value pairs, got {overrides!r}")
    return [f"{key}={json.dumps(value)}" for key, value in parsed.items()]


def parse_arguments(argv: Sequence[str]) -> tuple[str, Any, list[str]]:
    """The config file, SpeechBrain's run options and the ``key=value`` overrides,
    parsed by SpeechBrain's own ``parse_arguments``: run options such as ``--device``
    are SpeechBrain's, every other ``--key=value`` overrides a config key."""
    import speechbrain as sb

    config_file, run_opts, overrides = sb.parse_arguments(list(argv))
    return config_file, run_opts, overrides_as_items(overrides)
