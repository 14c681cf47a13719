"""Toolkit-free core of asr-merge: merge methods, streaming checkpoint I/O, recipes.

Never imports NeMo or SpeechBrain; the adapters (``nemo_merge``,
``speechbrain_merge``) plug their checkpoint kinds into :mod:`merge_core.checkpoint`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("asr-merge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from merge_core.engine import MergeResult, iter_merged, merge, open_inputs  # noqa: E402
from merge_core.errors import MergeError  # noqa: E402
from merge_core.recipe import Recipe, load_recipe  # noqa: E402
from merge_core.registry import available_methods, get_method, merge_method  # noqa: E402

__all__ = [
    "MergeError",
    "MergeResult",
    "Recipe",
    "available_methods",
    "get_method",
    "iter_merged",
    "load_recipe",
    "merge",
    "merge_method",
    "open_inputs",
]
