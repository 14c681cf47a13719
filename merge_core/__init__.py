"""asr-merge's toolkit-free library: merge methods, streaming checkpoint I/O, recipes,
evaluation and training helpers.

Never imports NeMo, SpeechBrain, their adapters or the application
(:mod:`merge_core.app`: the CLI, the demo, corpus synthesis, pretrained-model fetching).
Toolkits plug in their checkpoint kinds, evaluators and fine-tuning launchers through
entry points (:mod:`merge_core.plugins`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("asr-merge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from merge_core import moved  # noqa: E402

moved.install()

from merge_core.engine import MergeResult, iter_merged, merge, open_inputs  # noqa: E402
from merge_core.errors import MergeError  # noqa: E402
from merge_core.recipes import parse_recipe, run_recipe  # noqa: E402
from merge_core.recipes.merge import Recipe, load_recipe  # noqa: E402
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
    "parse_recipe",
    "run_recipe",
]
