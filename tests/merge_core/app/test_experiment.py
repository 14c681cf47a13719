"""Experiment files (``asr-merge run``): the demo's files as graphs of content-addressed jobs,
and every bad file refused, naming its key, before any job starts."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from merge_core.app.demo import EDITS, ROUNDS, SEARCH_ROW, TARGETS
from merge_core.app.experiment import load_experiment, parse_experiment, run_experiment
from merge_core.app.experiment.graph import build_graph
from merge_core.app.experiment.procedures import edit_name, round_name
from merge_core.app.experiment.runner import context, demo_toolkit, make_plan
from merge_core.errors import RecipeError
from merge_core.recipes.mact import RANGES as MACT_RANGES

REPO = Path(__file__).resolve().parents[3]
pytest.importorskip("nemo.collections.asr")


def fake_manifests(storage: Path, experiment) -> None:
    """Empty manifest files where the experiment reads them (a graph hashes the training ones)."""
    for path in [p for sets in experiment.domains.values() for p in sets.values()] + list(experiment.original.values()):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"{path}\n", encoding="utf-8")


def demo_graph(tmp_path: Path, name: str, **values):
    experiment = load_experiment(REPO / "configs" / "experiments" / f"demo_{name}.yaml",
                                 values={"storage": str(tmp_path), **values})
    fake_manifests(tmp_path, experiment)
    tk = demo_toolkit(experiment)
    plan = make_plan(experiment, tk)
    return experiment, plan, build_graph(experiment, plan, context(experiment, plan))


def test_the_full_nemo_demo_graph_starts_every_job_from_what_its_procedure_says(tmp_path):
    experiment, plan, graph = demo_graph(tmp_path, "nemo", run_optional=True)
    nodes = {n.name: n for n in graph.nodes.values()}
    paths = dict(graph.rows)
    finetunes = [n for n in graph.nodes.values() if n.kind == "finetune"]
    # single, LoRA, 2 sequential orders, 4 MAcT runs, iterative rounds 2..3 of two variants, editing steps 2..5 twice
    assert len(finetunes) == 2 * len(TARGETS) + 2 * (len(TARGETS) - 1) + 4 + 2 * (ROUNDS - 1) * len(TARGETS) + len(
        EDITS) * (len(TARGETS) - 1)
    assert len({n.output for n in finetunes}) == len(finetunes)
    # every node comes after what it needs; a node needs only nodes
    order = list(graph.nodes)
    assert all(order.index(need) < order.index(i) for i, n in graph.nodes.items() for need in n.needs)
    # sequential fine-tuning: each step from the previous one, the first step the single-domain expert
    full = nodes["sequential " + ">".join(TARGETS)]
    assert full.needs == (nodes["sequential " + ">".join(TARGETS[:-1])].id,)
    assert nodes["sequential " + ">".join(TARGETS[:2])].needs == (nodes[f"FT {TARGETS[0]}"].id,)
    assert nodes[f"FT {TARGETS[0]}"].needs == ()  # from the generalist, a file of the experiment
    # iterative AoDE: round k's experts from round k-1's average, which merges them (with the original)
    second = nodes[f"FT {TARGETS[1]} @{round_name('AoDE with orig', 1)}"]
    assert second.needs == (paths["AoDE with orig"].name,)
    fn, (recipe,) = nodes[round_name("AoDE with orig", 2)].task()
    assert recipe["include_base"] is True and second.output.as_posix() in recipe["models"]
    # sequential editing: step k's expert from the edited k-1; the last step merges into step 4
    edit = nodes[f"FT {TARGETS[2]} @{edit_name('TIES', 2, len(TARGETS))}"]
    assert edit.needs == (nodes[edit_name("TIES", 2, len(TARGETS))].id,)
    _, (ties,) = nodes["sequential editing TIES"].task()
    assert ties["base_model"] == str(nodes[edit_name("TIES", 4, len(TARGETS))].output)
    assert ties["parameters"] == {"lambda": 0.6, "density": 0.5, "trim_scope": "model"}
    # MAcT runs: the focus domain, hyper-parameters inside Ducorroy and Riad's ranges, all different
    mact = [n for n in finetunes if n.name.startswith("MAcT")]
    hypers = {n.task()[1][1].hyper for n in mact}
    assert len(hypers) == 4 and all(MACT_RANGES[k][0] <= v <= MACT_RANGES[k][1] for h in hypers for k, v in h)
    smact = nodes[f"SMAcT {TARGETS[0]}"]
    assert smact.needs == (nodes[f"FT {TARGETS[0]}"].id, *(n.id for n in mact))
    # the search: over the single-domain experts, every domain's dev set and dev-clean, its baselines first
    _, (search,) = nodes[SEARCH_ROW].task()
    assert search["method"] == "search" and search["max_forgetting_pct"] == 1.0 and search["trials"] == 40
    assert search["dev"]["sets"] == {d: experiment.domains[d]["dev"] for d in TARGETS}
    assert search["dev"]["original"] == {"dev_clean": experiment.original["dev_clean"]}
    assert search["baselines"]["AoDE re-weighted x4"]["weights"] == {d: 1.0 if d == TARGETS[0] else 0.25 for d in TARGETS}
    # the report's rows in Table VII's order, each evaluated by one job
    names = [r for r, _ in graph.rows]
    assert names[:1 + len(TARGETS)] == ["pretrained", *(f"FT {d}" for d in TARGETS)]
    assert names[names.index("task arithmetic") + 1] == SEARCH_ROW and names[-1] == f"SMAcT {TARGETS[0]}"
    assert sum(n.kind == "eval" for n in graph.nodes.values()) == len(names)
    # an expert's file name changes with what shapes it: its training data, its start model
    before = nodes[f"FT {TARGETS[0]}"].output
    Path(experiment.domains[TARGETS[0]]["train"]).write_text("other data\n", encoding="utf-8")
    assert build_graph(experiment, plan, context(experiment, plan)).rows[1][1] != before


def test_the_default_demo_runs_the_core_and_whisper_adds_the_llrd_ablation(tmp_path):
    _, _, graph = demo_graph(tmp_path / "nemo", "nemo")
    core = ["pretrained", *(f"FT {d}" for d in TARGETS), "sequential " + ">".join(TARGETS),
            "sequential " + ">".join(TARGETS[::-1]), "AoDE", "AoDE with orig", f"AoDE {TARGETS[0]} x4", "original x4",
            "TIES", "task arithmetic"]
    assert [r for r, _ in graph.rows] == core
    assert sum(n.kind == "finetune" for n in graph.nodes.values()) == len(TARGETS) + 2 * (len(TARGETS) - 1)
    experiment = load_experiment(REPO / "configs" / "experiments" / "demo_whisper.yaml",
                                 values={"storage": str(tmp_path / "whisper")})
    names = [name for _, name, _ in experiment.procedures]
    assert names == ["experts", "experts", "sequential"] + ["merge"] * 6 and experiment.procedures[1][2] == {"llrd": False}


SMALL = {
    "toolkit": "nemo",
    "procedures": [{"experts": {"domains": "all"}}, {"merge": {"name": "AoDE", "method": "average"}}],
}


def small_experiment(tmp_path: Path, **changes) -> dict:
    manifests = tmp_path / "data"
    manifests.mkdir(exist_ok=True)
    for name in ("a-train", "a-dev", "a-test", "b-train", "b-dev", "b-test", "test_clean"):
        (manifests / f"{name}.json").write_text("", encoding="utf-8")
    raw = {**SMALL, "storage": str(tmp_path / "storage"),
           "domains": {d: {s: str(manifests / f"{d}-{s}.json") for s in ("train", "dev", "test")} for d in "ab"},
           "original": {"test_clean": str(manifests / "test_clean.json")},
           "evaluate": {"forgetting_sets": ["test_clean"]}}
    raw.update(changes)
    return raw


BAD = {
    "missing manifest": ({"domains": {"a": {"train": "/nowhere/train.json", "dev": "x", "test": "y"}}},
                         "domains.a.train: /nowhere/train.json"),
    "unknown procedure": ({"procedures": [{"experts": {}}, {"averge": {"name": "x"}}]},
                          "procedures[1].averge: unknown procedure 'averge'"),
    "undeclared expert": ({"procedures": [{"experts": {"domains": ["a"]}},
                                          {"merge": {"name": "AoDE", "models": ["FT a", "FT c"]}}]},
                          "procedures[1].merge: 'FT c' (needed by 'AoDE') is not a model of this experiment"),
    "cycle": ({"procedures": [{"experts": {"domains": ["a"], "start": "AoDE", "report": False}},
                              {"merge": {"name": "AoDE", "models": ["FT a @AoDE"]}}]},
              "procedures[0].experts, procedures[1].merge: the models"),
    "unknown key": ({"finetune": {"epoch": 3}}, "unknown experiment key(s) ['finetune.epoch']"),
    "unknown Ray option": ({"executor": "ray", "ray": {"adress": "auto"}}, "unknown experiment key(s) ['ray.adress']"),
    "unknown domain": ({"procedures": [{"experts": {"domains": ["a", "c"]}}]},
                       "procedures[0].experts.domains: ['c'] are not domains of this experiment"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_experiment_is_refused_naming_its_key_before_any_job(tmp_path, case):
    changes, message = BAD[case]
    raw = small_experiment(tmp_path, **changes)
    with pytest.raises(RecipeError) as refused:
        run_experiment(parse_experiment(raw))
    assert message in str(refused.value)
    assert not (tmp_path / "storage" / "logs").exists() and not (tmp_path / "storage" / "experts").exists()


def test_the_run_command_and_its_hydra_form_refuse_a_bad_file_and_apply_overrides(tmp_path, capsys):
    from merge_core.app.cli import main

    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(small_experiment(tmp_path)), encoding="utf-8")
    assert main(["run", str(path), "procedures.1.merge.name=x", "procedures.1.merge.models=[FT a, FT z]"]) == 2
    assert "procedures[1].merge: 'FT z' (needed by 'x') is not a model of this experiment" in capsys.readouterr().err
    hydra = subprocess.run([sys.executable, "-m", "nemo_merge.run", f"--config-path={tmp_path}",
                            "--config-name=experiment", "+executor=slurm"], capture_output=True, text=True, timeout=300)
    assert hydra.returncode == 2
    assert "experiment key 'executor' must be one of ['local', 'ray'], got 'slurm'" in hydra.stdout + hydra.stderr
    experiment = load_experiment(path, ["finetune.epochs=2", "executor=ray", "ray.address=auto"])
    assert experiment.finetune.epochs == 2 and experiment.executor == "ray" and experiment.ray == {"address": "auto"}
    assert replace(experiment, executor="local").procedures == experiment.procedures


def readme_experiments() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Experiments: `asr-merge run`", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```yaml\n")[1:]]


@pytest.mark.parametrize("index", [0, 1])
def test_the_readme_experiments_are_valid_files_refused_only_for_their_placeholder_data(tmp_path, index):
    path = tmp_path / "experiment.yaml"
    path.write_text(readme_experiments()[index], encoding="utf-8")
    experiment = load_experiment(path)
    assert len(experiment.procedures) >= 6 and experiment.domains
    with pytest.raises(RecipeError) as refused:
        run_experiment(experiment)
    first = next(iter(experiment.domains))
    assert f"domains.{first}.train: /shared/" in str(refused.value)
