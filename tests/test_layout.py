"""The distribution's layout holds: the core names no adapter, the library never imports
the application, adapters never import each other, toolkits arrive as plugins, every
CLI command works or says what to install when only the core is importable, and moved
modules keep their old import paths for one release."""

from __future__ import annotations

import ast
import json
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "merge_core"
APP = CORE / "app"
ADAPTERS = ("nemo_merge", "speechbrain_merge")


def python_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def imported_modules(tree: ast.AST) -> list[str]:
    """Every module an ``import``/``from ... import`` or an ``import_module("...")`` /
    ``__import__("...")`` call with a literal name brings in."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append(node.args[0].value)
    return found


def strings(tree: ast.AST) -> list[str]:
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_the_core_never_names_an_adapter():
    offenders = []
    for path in python_files(CORE):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        named = [m for m in imported_modules(tree) if m.split(".")[0] in ADAPTERS]
        named += [s for s in strings(tree) if any(a in s for a in ADAPTERS)]  # importlib strings, docstrings
        offenders += [f"{path.relative_to(REPO)}: {n!r}" for n in named]
    assert not offenders, "\n".join(offenders)


def test_the_library_never_imports_the_application():
    offenders = []
    for path in python_files(CORE):
        if APP in path.parents:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        offenders += [f"{path.relative_to(REPO)}: {m}" for m in imported_modules(tree) if m.startswith("merge_core.app")]
    assert not offenders, "\n".join(offenders)


def test_every_library_module_imports_with_the_application_missing():
    code = """
import importlib, importlib.abc, pkgutil, sys

class NoApp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "merge_core.app" or name.startswith("merge_core.app."):
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, NoApp())
import merge_core
names = [m.name for m in pkgutil.walk_packages(merge_core.__path__, "merge_core.") if not m.name.startswith("merge_core.app")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 30  # every library module was imported, not a handful


def test_adapters_never_import_each_other():
    offenders = []
    for adapter in ADAPTERS:
        other = next(a for a in ADAPTERS if a != adapter)
        for path in python_files(REPO / adapter):
            modules = imported_modules(ast.parse(path.read_text(encoding="utf-8")))
            offenders += [f"{path.relative_to(REPO)}: {m}" for m in modules if m.split(".")[0] == other]
    assert not offenders, "\n".join(offenders)


def test_toolkits_are_discovered_through_entry_points():
    from merge_core.checkpoint import kinds
    from merge_core.plugins import toolkits

    found = toolkits()
    assert list(found) == ["nemo", "speechbrain"]
    kind_names = [k.name for k in kinds()]
    for plugin in found.values():
        assert plugin.checkpoint_kinds and all(k.name in kind_names for k in plugin.checkpoint_kinds)
        assert plugin.evaluate and plugin.train_run and "default" in plugin.demos and plugin.dev_evaluators
    assert "whisper-tiny.en" in found["speechbrain"].demos


@pytest.mark.parametrize("name", ["nemo", "speechbrain"])
def test_each_plugin_reference_resolves(name):
    from merge_core.app.demo import DemoToolkit
    from merge_core.plugins import toolkit

    plugin = toolkit(name)
    pytest.importorskip(plugin.requires[0])
    assert callable(plugin.load(plugin.evaluate, "evaluation"))
    assert callable(plugin.load(plugin.train_run, "MAcT runs"))
    assert all(callable(plugin.load(ref, "dev evaluation")) for ref in plugin.dev_evaluators.values())
    assert all(isinstance(plugin.load(ref, "demo"), DemoToolkit) for ref in plugin.demos.values())


def test_an_unknown_toolkit_names_the_installed_ones():
    from merge_core.plugins import ToolkitUnavailableError, toolkit

    with pytest.raises(ToolkitUnavailableError, match=r"'espnet' is not installed \(installed toolkits: nemo, speechbrain\)"):
        toolkit("espnet")


# Runs every sub-command in one process where neither adapter nor toolkit can be imported.
WITHOUT_TOOLKITS = """
import contextlib, importlib.abc, io, json, sys

BLOCKED = {"nemo_merge", "speechbrain_merge", "nemo", "speechbrain", "lightning", "pytorch_lightning"}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
from merge_core.app.cli import main

results = {}
for label, argv in json.loads(sys.argv[1]).items():
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException as e:  # what a user would see as a traceback
            rc, err = "traceback", io.StringIO(f"{type(e).__name__}: {e}")
    results[label] = {"rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue()}
print(json.dumps(results))
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_every_command_without_toolkits_works_or_says_which_extra_to_install(tmp_path):
    for name in ("a.nemo", "b.nemo"):
        write(tmp_path / name, "not read")
    for name in ("CKPT+a", "CKPT+b"):
        write(tmp_path / name / "CKPT.yaml", "end-of-epoch: true\n")
    write(tmp_path / "dev.csv", "ID,duration,wav,spk_id,wrd\n")
    merge = write(tmp_path / "merge.yaml", f"method: average\nmodels: [{tmp_path}/a.nemo, {tmp_path}/b.nemo]\noutput: {tmp_path}/o.nemo\n")
    soup = write(tmp_path / "soup.yaml", f"method: greedy_soup\nmodels: [{tmp_path}/CKPT+a, {tmp_path}/CKPT+b]\n"
                 f"dev: {{manifest: {tmp_path}/dev.csv}}\noutput: {tmp_path}/CKPT+soup\n")
    search = write(tmp_path / "search.yaml", f"method: search\nbase_model: {tmp_path}/a.nemo\nmodels: [{tmp_path}/b.nemo]\n"
                   f"dev: {{sets: {{t: {tmp_path}/dev.json}}, original: {{o: {tmp_path}/dev.json}}}}\n"
                   f"output: {tmp_path}/s.nemo\n")
    mact = write(tmp_path / "mact.yaml", f"toolkit: nemo\nbase_model: {tmp_path}/a.nemo\ntrain: {{config: x.yaml}}\n"
                 f"output: {tmp_path}/m.nemo\n")
    evaluation = write(tmp_path / "eval.yaml", f"toolkit: speechbrain\nmodels: [{tmp_path}/CKPT+a]\n"
                       f"manifests: {{test_clean: {tmp_path}/dev.csv, test_other: {tmp_path}/dev.csv}}\n")
    write(tmp_path / "LibriSpeech" / "dev-clean" / "1" / "2" / "1-2.trans.txt", "1-2-0000 HELLO\n")
    # a FLAC header of one second at 16 kHz: all prepare-librispeech reads of the audio
    streaminfo = struct.pack(">HH3s3sQ16s", 4096, 4096, b"\0" * 3, b"\0" * 3, (16000 << 44) | (15 << 36) | 16000, b"\0" * 16)
    flac = tmp_path / "LibriSpeech" / "dev-clean" / "1" / "2" / "1-2-0000.flac"
    flac.write_bytes(b"fLaC" + bytes([0, 0, 0, len(streaminfo)]) + streaminfo)
    not_a_folder = write(tmp_path / "corpus", "a file")
    experiment = write(tmp_path / "experiment.yaml", f"toolkit: speechbrain\nstorage: {tmp_path}/x\n"
                       f"domains: {{d: {{train: {tmp_path}/dev.csv, dev: {tmp_path}/dev.csv, test: {tmp_path}/dev.csv}}}}\n"
                       f"original: {{test_clean: {tmp_path}/dev.csv}}\nprocedures: [experts: {{}}]\n"
                       "evaluate: {forgetting_sets: [test_clean]}\n")
    commands = {
        "merge": ["merge", str(merge), "-q"],
        "select": ["select", str(soup), "-q"],
        "mact": ["mact", str(mact), "-q"],
        "search": ["search", str(search), "-q"],
        "eval": ["eval", str(evaluation), "-q"],
        "demo": ["demo", "--smoke", "--toolkit", "nemo", "--out", str(tmp_path / "demo")],
        "run": ["run", str(experiment), "-q"],
        "methods": ["methods"],
        "get-model": ["get-model", "--list"],
        "make-corpus": ["make-corpus", str(not_a_folder), "--size", "smoke", "-q"],
        "prepare-librispeech": ["prepare-librispeech", str(tmp_path / "LibriSpeech"), str(tmp_path / "m")],
    }
    done = subprocess.run([sys.executable, "-c", WITHOUT_TOOLKITS, json.dumps(commands)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    extras = {"merge": "nemo", "select": "speechbrain", "mact": "nemo", "search": "nemo", "eval": "speechbrain", "demo": "nemo",
              "run": "speechbrain"}
    for command, extra in extras.items():
        result = results[command]
        assert result["rc"] == 2, (command, result)
        assert result["stderr"].startswith("asr-merge: error:"), (command, result)
        assert f"pip install 'asr-merge[{extra}]'" in result["stderr"], (command, result)
    assert results["methods"]["rc"] == 0 and "greedy_soup" in results["methods"]["stdout"]
    assert results["get-model"]["rc"] == 0 and "whisper-tiny.en" in results["get-model"]["stdout"]
    assert results["make-corpus"]["rc"] == 2 and "is not a folder" in results["make-corpus"]["stderr"]
    assert results["prepare-librispeech"]["rc"] == 0 and (tmp_path / "m" / "dev_clean.json").is_file()
    assert all(r["rc"] != "traceback" and "Traceback" not in r["stderr"] for r in results.values()), results


def test_moved_modules_keep_their_old_paths_for_one_release():
    import merge_core.recipes.greedy_soup

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from merge_core import soup  # noqa: F401
        import merge_core.corpus.domains as old_domains
    import merge_core.app.corpus.domains as new_domains

    assert soup is merge_core.recipes.greedy_soup and old_domains is new_domains
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("merge_core.soup moved to merge_core.recipes.greedy_soup" in m for m in messages), messages


def test_a_ties_recipe_is_read_once_planned_once_and_written_once(tmp_path, monkeypatch):
    """The front door's path, step by step, with no step taken twice."""
    import merge_core.engine as engine
    import merge_core.recipes.config as config
    from merge_core import run_recipe
    from tests.merge_core.conftest import make_state, save_kind

    base = make_state(0)
    paths = [save_kind(s, tmp_path, n, "safetensors") for n, s in [("base", base), ("a", make_state(1, base)), ("b", make_state(2, base))]]
    recipe = write(tmp_path / "ties.yaml", f"method: ties\nbase_model: {paths[0]}\nmodels: [{paths[1]}, {paths[2]}]\n"
                   f"output: {tmp_path / 'out.safetensors'}\n")
    calls: dict[str, int] = {}

    def counting(module, name):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    counting(config.OmegaConf, "load")
    counting(engine, "plan_actions")
    counting(engine, "open_inputs")
    counting(engine, "create_writer")
    result = run_recipe(recipe, ["parameters.density=0.5"], progress=False)
    assert calls == {"load": 1, "open_inputs": 1, "plan_actions": 1, "create_writer": 1}
    assert result.summary.endswith("copied") and "merged by ties" in result.summary


def test_benchmarks_import_neither_tests_nor_each_other():
    shared = {"benchmarks", "benchmarks.measure", "benchmarks.synthetic", "benchmarks.tables"}
    offenders = []
    for path in python_files(REPO / "benchmarks"):
        for module in imported_modules(ast.parse(path.read_text(encoding="utf-8"))):
            top = module.split(".")[0]
            if top == "tests" or (top == "benchmarks" and module not in shared) or top in ("measure", "merge_bench"):
                offenders.append(f"{path.relative_to(REPO)}: {module}")
        assert "sys.path" not in path.read_text(encoding="utf-8"), path
    assert not offenders, "\n".join(offenders)
