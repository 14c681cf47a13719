"""Toolkit plugins: what an adapter brings to the core, discovered through entry points.

A toolkit adapter (the NeMo and SpeechBrain ones shipped here, or a third party's for
ESPnet, k2/icefall or plain Hugging Face) declares one :class:`ToolkitPlugin` and
registers it in its ``pyproject.toml``:

.. code-block:: toml

    [project.entry-points."asr_merge.toolkits"]
    espnet = "espnet_merge.plugin:TOOLKIT"

The core never imports an adapter by name: :func:`toolkit` and :func:`toolkits` find
them here. A plugin is declared without importing its toolkit; each ``"module:attribute"``
reference it holds is imported only when it is used (:meth:`ToolkitPlugin.load`), and an
``ImportError`` then becomes a :class:`ToolkitUnavailableError` that says which extra to
install.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Mapping

from merge_core.errors import MergeError

if TYPE_CHECKING:
    from merge_core.checkpoint.base import CheckpointKind

ENTRY_POINT_GROUP = "asr_merge.toolkits"
DISTRIBUTION = "asr-merge"

# "package.module:attribute", or the object itself (tests, programmatic plugins)
Reference = str | Callable[..., Any]


class ToolkitUnavailableError(MergeError):
    """A toolkit is not installed, or its adapter or the toolkit itself cannot be imported."""


def install_hint(extra: str) -> str:
    """The command that installs a toolkit's extra."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


@dataclass(frozen=True)
class ToolkitPlugin:
    """One toolkit adapter's contributions to the core.

    Parameters
    ----------
    name : str
        The toolkit's name as configs give it (``toolkit: nemo``).
    extra : str
        The pip extra that installs the toolkit (``asr-merge[nemo]``).
    requires : tuple of str
        Modules of the toolkit itself, imported before any reference below is used, so
        a missing toolkit is reported as such rather than as a failure deep inside.
    checkpoint_kinds : tuple of CheckpointKind
        Its checkpoint formats, readable and writable by every recipe; their readers
        and writers must not import the toolkit.
    evaluate : Reference, optional
        ``evaluate(config, progress) -> (report, files)``: the ``asr-merge eval`` back end.
    dev_evaluators : mapping of str to Reference
        Checkpoint kind -> ``factory(template reader, dev set, shared=None) -> evaluator``:
        how greedy soups and forgetting-budget searches score a candidate merge of that
        kind in memory. ``evaluator(state_dict)`` is the dev WER, ``evaluator.stats(state_dict)``
        its edit counts; ``shared``, another evaluator of the factory, lends its restored
        model (one model, several dev sets).
    train_run : Reference, optional
        ``train_run(recipe, index, hyper, run_dir) -> best checkpoint``: one fine-tuning run
        through the toolkit's own entry point (MAcT).
    demos : mapping of str to Reference
        Demo name (``default``, or a pretrained generalist such as ``whisper-tiny.en``) ->
        the demo's ``DemoToolkit`` (:mod:`merge_core.app.demo`).
    collect_grams : Reference, optional
        ``collect_grams(config, progress) -> path``: the ``asr-merge grams`` back end, an
        expert's Gram file for ``method: regmean`` through the toolkit's own forward
        (:mod:`merge_core.grams`).
    """

    name: str
    extra: str
    requires: tuple[str, ...] = ()
    checkpoint_kinds: tuple["CheckpointKind", ...] = ()
    evaluate: Reference | None = None
    dev_evaluators: Mapping[str, Reference] = field(default_factory=dict)
    train_run: Reference | None = None
    demos: Mapping[str, Reference] = field(default_factory=dict)
    collect_grams: Reference | None = None

    def load(self, reference: Reference | None, what: str) -> Any:
        """The object ``reference`` names, imported now after the toolkit itself
        (``requires``); ``what`` says what it is for in the error when the toolkit is
        missing or the plugin does not provide it."""
        if reference is None:
            raise ToolkitUnavailableError(f"toolkit {self.name!r} provides no {what}")
        module, _, attribute = reference.partition(":") if isinstance(reference, str) else ("", "", "")
        try:
            for required in self.requires:
                importlib.import_module(required)
            return getattr(importlib.import_module(module), attribute) if module else reference
        except ImportError as e:
            raise ToolkitUnavailableError(
                f"{what} needs the {self.name} toolkit, which cannot be imported ({e}): {install_hint(self.extra)}"
            ) from None


@dataclass
class _Registry:
    plugins: dict[str, ToolkitPlugin] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # name -> why its entry point did not load


def _register_kinds(plugin: ToolkitPlugin) -> None:
    from merge_core.checkpoint.base import register_kind

    for kind in plugin.checkpoint_kinds:
        register_kind(kind)


@functools.cache
def _discovered() -> _Registry:
    """Every plugin of the entry-point group, loaded once; one that fails to import is
    kept aside with the reason, so the error can say what to install."""
    import merge_core.checkpoint.formats  # noqa: F401  (built-in kinds first: a toolkit's are tried before them)

    registry = _Registry()
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugin = point.load()
        except ImportError as e:
            extra = point.extras[0] if point.extras else point.name
            registry.broken[point.name] = f"{e}; {install_hint(extra)}"
            continue
        if not isinstance(plugin, ToolkitPlugin) or plugin.name != point.name:
            raise MergeError(f"entry point {point.name} = {point.value} is not a ToolkitPlugin named {point.name!r}")
        registry.plugins[plugin.name] = plugin
        _register_kinds(plugin)
    return registry


def register_toolkit(plugin: ToolkitPlugin) -> None:
    """Add a plugin that has no entry point (a plugin under development, a test's)."""
    registry = _discovered()
    registry.plugins[plugin.name] = plugin
    registry.broken.pop(plugin.name, None)
    _register_kinds(plugin)


def unregister_toolkit(name: str) -> None:
    """Remove a plugin added by :func:`register_toolkit` (its checkpoint kinds stay)."""
    _discovered().plugins.pop(name, None)


def toolkits() -> dict[str, ToolkitPlugin]:
    """The installed toolkits by name."""
    return dict(_discovered().plugins)


def unavailable_toolkits() -> dict[str, str]:
    """Toolkits whose entry point exists but whose adapter cannot be imported, with why."""
    return dict(_discovered().broken)


def toolkit(name: str) -> ToolkitPlugin:
    """The installed toolkit ``name``; the error names what is installed and what to install."""
    registry = _discovered()
    if name in registry.plugins:
        return registry.plugins[name]
    if name in registry.broken:
        raise ToolkitUnavailableError(f"toolkit {name!r} is not available ({registry.broken[name]})")
    installed = ", ".join(sorted(registry.plugins)) or "none"
    raise ToolkitUnavailableError(
        f"toolkit {name!r} is not installed (installed toolkits: {installed}); "
        f"a toolkit shipped with asr-merge comes with its extra: {install_hint(name)}"
    )
