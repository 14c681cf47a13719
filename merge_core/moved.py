"""Old import paths of modules that moved in 0.2, kept working for one release.

``import merge_core.soup`` still works, with a :class:`DeprecationWarning` naming the new
path, and gives the very module object of the new path (no second copy, so classes and
registries stay one). The README's "Moved in 0.2" table lists the same moves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {
    "merge_core.cli": "merge_core.app.cli",
    "merge_core.demo": "merge_core.app.demo",
    "merge_core.corpus": "merge_core.app.corpus",
    "merge_core.audio": "merge_core.app.corpus.audio",
    "merge_core.pretrained": "merge_core.app.pretrained.fetch",
    "merge_core.whisper_ct2": "merge_core.app.pretrained.whisper_ct2",
    "merge_core.recipe": "merge_core.recipes.merge",
    "merge_core.soup": "merge_core.recipes.greedy_soup",
    "merge_core.mam": "merge_core.recipes.mam",
    "merge_core.mact": "merge_core.recipes.mact",
    "merge_core.lmam": "merge_core.attention.lmam",
    "merge_core.name_map": "merge_core.attention.name_map",
    "merge_core.similarity": "merge_core.attention.similarity",
    "merge_core.sparsify": "merge_core.methods.sparsify",
    "merge_core.manifests": "merge_core.evaluation.manifests",
    "merge_core.provenance": "merge_core.checkpoint.provenance",
    "merge_core.checkpoint.atomic": "merge_core.atomic",
    # since: the demo's plan became every experiment's (asr-merge run)
    "merge_core.app.demo.plan": "merge_core.app.experiment.plan",
}


def new_name(old: str) -> str | None:
    """Where the module ``old`` lives now (a moved package's submodules moved with it).

    >>> new_name("merge_core.corpus.domains")
    'merge_core.app.corpus.domains'
    >>> new_name("merge_core.engine") is None
    True
    """
    for before, after in MOVED.items():
        if old == before or old.startswith(before + "."):
            return after + old[len(before):]
    return None


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the module at its new one, with a deprecation warning."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        target = new_name(spec.name)
        warnings.warn(
            f"{spec.name} moved to {target}; the old path goes away in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(target)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already loaded."""


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
