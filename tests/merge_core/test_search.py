"""The forgetting-budget search's recipe, study and choice, with a dev evaluation whose
answer is known: target "WER" = distance of one weight to the expert's, original "WER" =
its distance to the generalist's, so moving toward the expert trades one for the other.
The real toolkits' searches are in tests/nemo_merge/test_search.py and
tests/speechbrain_merge/test_search.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_core import run_recipe
from merge_core.app.cli import main
from merge_core.checkpoint.safetensors_io import read_provenance
from merge_core.errors import RecipeError, SearchError
from merge_core.evaluation.wer import WerStats
from merge_core.plugins import ToolkitPlugin, register_toolkit, unregister_toolkit
from merge_core.recipes import load_recipe_config, parse_recipe
from merge_core.recipes.search import Objective, SearchRecipe, _default_names
from tests.merge_core.conftest import make_state, save_kind

pytest.importorskip("optuna")

LINEAR = "encoder.layers.0.self_attn.linear_q.weight"
WORDS = 10_000
BUDGET = 30.0  # % forgetting: some of the seeded trials keep within it, some do not


class DistanceEvaluator:
    """"Errors" per 10,000 words: 10,000 x mean |w - goal| of the LINEAR weight."""

    def __init__(self, goal: torch.Tensor) -> None:
        self.goal = goal

    def stats(self, state) -> WerStats:
        errors = round(WORDS * float((state[LINEAR].float() - self.goal).abs().mean()))
        return WerStats(insertions=errors, words=WORDS, utterances=1)

    def __call__(self, state) -> float:
        return self.stats(state).wer


@pytest.fixture
def inputs(tmp_path):
    """The generalist and two experts as safetensors; a fake toolkit scoring safetensors
    templates: dev set "target" wants expert 0's weight, "original" the generalist's."""
    base = make_state(0)
    # neither expert changed encoder.scale (a frozen tensor): the search copies it
    experts = [{**make_state(i, base), "encoder.scale": base["encoder.scale"].clone()} for i in (1, 2)]
    paths = [save_kind(s, tmp_path, n, "safetensors") for n, s in [("generalist", base), ("e0", experts[0]), ("e1", experts[1])]]
    built = []

    def factory(template, dev, shared=None):
        built.append((dev.manifest.name, shared is not None))
        goal = experts[0][LINEAR] if dev.manifest.name == "target.json" else base[LINEAR]
        # an offset keeps the generalist's original "WER" above 0 (forgetting is relative to it)
        return DistanceEvaluator(goal + 0.05)

    register_toolkit(ToolkitPlugin(name="fake", extra="fake", dev_evaluators={"safetensors": factory}))
    for name in ("target.json", "original.json"):
        (tmp_path / name).write_text("")
    yield paths, built
    unregister_toolkit("fake")


def recipe(tmp_path: Path, paths: list[Path], **extra) -> Path:
    raw = {
        "method": "search",
        "base_model": str(paths[0]),
        "models": [str(p) for p in paths[1:]],
        "dev": {"sets": {"target": str(tmp_path / "target.json")}, "original": {"orig": str(tmp_path / "original.json")}},
        "max_forgetting_pct": BUDGET,
        "trials": 12,
        "output": str(tmp_path / "out.safetensors"),
        **extra,
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_written_merge_is_the_best_trial_within_the_budget(tmp_path, inputs):
    paths, built = inputs
    result = run_recipe(recipe(tmp_path, paths), progress=False)
    assert built == [("target.json", False), ("original.json", True)]  # one model restored, shared by both sets
    log = json.loads((tmp_path / "out.safetensors.trials.json").read_text())
    trials = log["trials"]
    assert len(trials) == 12 and [t["baseline"] for t in trials[:3]] == ["AoDE", "TIES", "task arithmetic"]
    assert trials[0]["params"]["method"] == "average" and trials[0]["params"]["base_weight"] == 0.0
    feasible = [t for t in trials if t["feasible"]]
    best = min(feasible, key=lambda t: (t["objective"], t["forgetting_pct"], t["number"]))
    assert log["chosen"] == best["number"] and log["outcome"] == "within budget"
    assert best["forgetting_pct"] <= BUDGET < min(t["forgetting_pct"] for t in trials if not t["feasible"])
    # the budget decided: the lowest target WER of all was over it
    assert not min(trials, key=lambda t: t["objective"])["feasible"]
    # forgetting is the pooled original WER's relative increase over the generalist's
    reference = log["reference"]["dev"]["orig"]["wer"]
    assert best["forgetting_pct"] == pytest.approx(100 * (best["dev"]["orig"]["wer"] - reference) / reference)
    # the written merge is that trial's: the same weights score the same
    provenance = read_provenance(result.output)
    assert provenance["method"] == "search" and provenance["recipe"]["search"]["trial"] == best["number"]
    assert provenance["recipe"]["search"]["within_budget"] and provenance["parameters"] == best["params"]
    out = load_file(result.output)
    assert provenance["tensors"]["copied_unchanged"] == ["encoder.scale"]
    assert torch.equal(out["encoder.scale"], load_file(paths[0])["encoder.scale"])
    goal = load_file(paths[1])[LINEAR] + 0.05
    errors = round(WORDS * float((out[LINEAR].float() - goal).abs().mean()))
    assert 100 * errors / WORDS == pytest.approx(best["dev"]["target"]["wer"])
    assert (tmp_path / "out.safetensors.pareto.png").stat().st_size > 10_000
    assert (tmp_path / "out.safetensors.study.db").is_file()


def test_a_budget_no_trial_meets_writes_nothing_unless_asked(tmp_path, inputs, capsys):
    paths, _ = inputs
    path = recipe(tmp_path, paths, trials=4, max_forgetting_pct=-100.0)
    assert main(["search", str(path), "-q"]) == 2
    error = capsys.readouterr().err
    assert "no trial of study 'out.safetensors'" in error and "the least forgetting reached was" in error
    assert not (tmp_path / "out.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    log = json.loads((tmp_path / "out.safetensors.trials.json").read_text())
    assert log["outcome"] == "refused" and log["chosen"] is None and len(log["trials"]) == 4
    # the same study (no new trial) writes its least-forgetting trial when asked to
    assert main(["search", str(path), "if_infeasible=least_forgetting", "-q"]) == 0
    least = min(log["trials"], key=lambda t: (t["forgetting_pct"], t["objective"], t["number"]))
    search = read_provenance(tmp_path / "out.safetensors")["recipe"]["search"]
    assert search["trial"] == least["number"] and not search["within_budget"]
    assert len(json.loads((tmp_path / "out.safetensors.trials.json").read_text())["trials"]) == 4


def test_a_resumed_study_runs_only_the_remaining_trials(tmp_path, inputs):
    paths, _ = inputs
    path = recipe(tmp_path, paths, trials=3, if_infeasible="least_forgetting")  # the 3 fixed recipes forget > 30 %
    run_recipe(path, progress=False)
    first = json.loads((tmp_path / "out.safetensors.trials.json").read_text())["trials"]
    run_recipe(path, ["trials=5"], progress=False)
    trials = json.loads((tmp_path / "out.safetensors.trials.json").read_text())["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3, 4]
    assert trials[:3] == first  # read back from the study, not run again
    import optuna

    study = optuna.load_study(study_name="out.safetensors", storage=f"sqlite:///{tmp_path / 'out.safetensors.study.db'}")
    assert len(study.trials) == 5 and study.trials[3].constraints == {"forgetting": pytest.approx(
        trials[3]["forgetting_pct"] - BUDGET)}
    # a study is resumed only by the recipe that made it
    with pytest.raises(SearchError, match=r"was run with another recipe \(it differs in \['max_forgetting_pct'\]\)"):
        run_recipe(path, ["max_forgetting_pct=5"], progress=False)


def test_nsga2_searches_the_two_objective_front(tmp_path, inputs):
    paths, _ = inputs
    run_recipe(recipe(tmp_path, paths, sampler="nsga2", trials=6), progress=False)
    import optuna

    study = optuna.load_study(study_name="out.safetensors", storage=f"sqlite:///{tmp_path / 'out.safetensors.study.db'}")
    assert len(study.directions) == 2 and len(study.trials) == 6
    log = json.loads((tmp_path / "out.safetensors.trials.json").read_text())
    # the lowest target WER within the budget is on Optuna's (constrained) Pareto front
    assert log["trials"][log["chosen"]]["feasible"] and log["chosen"] in {t.number for t in study.best_trials}


def test_group_lambdas_draw_one_lambda_per_group(tmp_path, inputs):
    paths, _ = inputs
    space = {"methods": ["task_arithmetic"], "group_lambdas": {"enc": "encoder.*", "dec": "decoder.*"}}
    run_recipe(recipe(tmp_path, paths, space=space, trials=4, max_forgetting_pct=1000.0), progress=False)
    trials = json.loads((tmp_path / "out.safetensors.trials.json").read_text())["trials"]
    # encoder.* and decoder.* cover every merged tensor: no plain lambda is drawn
    assert all({"lambda.enc", "lambda.dec"} <= set(t["params"]) and "lambda" not in t["params"] for t in trials)
    assert trials[0]["params"]["lambda.enc"] == trials[0]["params"]["lambda.dec"] == 1.0  # task arithmetic's default
    with pytest.raises(RecipeError, match=r"space.group_lambdas.none: pattern 'nothing.\*' matches no merged tensor"):
        run_recipe(recipe(tmp_path, paths, space={**space, "group_lambdas": {"none": "nothing.*"}}), progress=False)


# ---------------------------------------------------------------------------
# the recipe is checked before anything is opened: no file is read, no study made


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("space.methods=[nope]", "space.methods: unknown merge method 'nope'"),
        ("space.methods=[greedy_soup]", "'greedy_soup' is a whole-model procedure"),
        ("space.methods=[slerp]", r"space.methods: slerp: method 'slerp' merges 2 model\(s\); the recipe gives 3"),
        ("space.lambda=[]", r"space.lambda must be a range \[low, high\] of two numbers, got \[\]"),
        ("space.lambda=[1.0, 0.5]", r"space.lambda \[1.0, 0.5\] is empty"),
        ("space.density=[0.0, 0.5]", r"space.density \[0.0, 0.5\]: values must be > 0"),
        ("space.weights=[0, 0]", "gives every expert weight 0"),
        ("space.weights=[-1, 1]", "values must be >= 0"),
        ("space.lambda=null", "space.group_lambdas needs space.lambda"),
        ("max_forgetting_pct=lots", "'max_forgetting_pct' must be a finite number, got 'lots'"),
        ("trials=0", "'trials' must be at least 1"),
        ("sampler=random", "'sampler' must be one of tpe, nsga2"),
        ("spaec={}", r"unknown recipe key\(s\) \['spaec'\]"),
        ("space.lamda=[0, 1]", r"unknown space key\(s\) \['lamda'\]"),
        ("objective.weights.nowhere=2", r"objective.weights: \['nowhere'\] are not target sets"),
        ("baselines.mine={method: ties, lambda: 9}", r"baselines.mine: lambda = 9 lies outside space.lambda \[0.1, 1.5\]"),
        ("dev.original={target: x.json}", r"set name\(s\) \['target'\] are both target sets and original sets"),
        ("models.0={model: a.safetensors, weight: 2}", "a search draws the weights"),
    ],
)
def test_bad_recipes_are_refused_before_anything_is_opened(tmp_path, override, message, capsys):
    raw = {
        "method": "search",
        "base_model": str(tmp_path / "missing_generalist.safetensors"),
        "models": ["a.safetensors", "b.safetensors", "c.safetensors"],
        "dev": {"sets": {"target": "t.json"}, "original": {"orig": "o.json"}},
        "space": {"group_lambdas": {"enc": "encoder.*"}},
        "output": str(tmp_path / "out.safetensors"),
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["search", str(path), override, "-q"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"asr-merge: error: {path}: ") and "Traceback" not in error
    assert __import__("re").search(message, error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.yaml"]  # no study, no log


def test_a_search_runs_without_a_toolkit_import_until_it_decodes(tmp_path):
    """Validation needs neither Optuna nor a toolkit: ``merge_core`` imports without them."""
    code = ("import sys; from merge_core.recipes import parse_recipe; "
            f"parse_recipe({{'method': 'search', 'base_model': 'g.nemo', 'models': ['a.nemo'], "
            f"'dev': {{'sets': {{'t': 't.json'}}, 'original': {{'o': 'o.json'}}}}, 'output': '{tmp_path}/o.nemo'}}); "
            "print(sorted(m for m in ('optuna', 'nemo', 'speechbrain') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_default_space_names_and_objective():
    assert _default_names(["o/experts/noisy/expert.nemo", "o/experts/accented/expert.nemo"]) == ["noisy/expert", "accented/expert"]
    objective = Objective.from_mapping({"weights": {"a": 3.0}}, ["a", "b"])
    assert objective({"a": 10.0, "b": 30.0}) == pytest.approx(15.0)  # (3 x 10 + 1 x 30) / 4
    with pytest.raises(RecipeError, match="objective.weights are all 0"):
        Objective.from_mapping({"weights": {"a": 0, "b": 0}}, ["a", "b"])
    search = parse_recipe(load_recipe_config({
        "method": "search", "base_model": "g.safetensors", "models": ["x/a.safetensors", "y/a.safetensors"],
        "dev": {"sets": {"t": "t.json"}, "original": {"o": "o.json"}}, "output": "out/m.safetensors"}))
    assert isinstance(search, SearchRecipe)
    assert [e.name for e in search.experts] == ["x/a", "y/a"]
    assert search.space.methods == ("average", "task_arithmetic", "ties") and search.trials == 40
    assert search.max_forgetting_pct == 1.0 and search.study.name == "m.safetensors"
    assert search.study.storage == f"sqlite:///{Path('out/m.safetensors.study.db').resolve()}"
    assert str(search.dev.log) == "out/m.safetensors.trials.json" and str(search.plot) == "out/m.safetensors.pareto.png"


def test_without_optuna_the_error_says_which_extra_to_install(tmp_path, inputs):
    paths, _ = inputs
    code = f"""
import importlib.abc, sys

class NoOptuna(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "optuna":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NoOptuna())
from merge_core.app.cli import main
sys.exit(main(["search", {str(recipe(tmp_path, paths))!r}, "-q"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "method: search needs Optuna" in done.stderr and "pip install 'asr-merge[search]'" in done.stderr
    assert not (tmp_path / "out.safetensors.study.db").exists()
