"""Forgetting-budget searches of real ``.nemo`` models, decoded for real: the shipped
generalist and two experts made from it (one encoder layer scaled, the decoder scaled),
on espeak-ng speech split into a "target" and an "original" dev set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from merge_core.app.cli import main
from merge_core.recipes import run_recipe
from tests.checkpoint_helpers import scaled_copy

pytest.importorskip("nemo.collections.asr")
pytest.importorskip("optuna")

REPO = Path(__file__).resolve().parents[2]
GENERALIST = REPO / "models" / "nemo_generalist.nemo"
BUDGET = 5.0  # % forgetting: the seeded trials fall on both sides of it


@pytest.fixture(scope="module")
def search_inputs(tmp_path_factory, nemo_audio_manifest) -> dict:
    """The experts and the two dev manifests (beside the audio manifest, whose relative
    paths they keep): the first four utterances are the target domain, the rest the original."""
    folder = tmp_path_factory.mktemp("nemo_search")
    experts = [scaled_copy(GENERALIST, folder / "encoder.nemo", "encoder.layers.1.", 1.3),
               scaled_copy(GENERALIST, folder / "decoder.nemo", "decoder.", 1.2)]
    lines = nemo_audio_manifest.read_text().splitlines()
    target, original = nemo_audio_manifest.parent / "search_target.json", nemo_audio_manifest.parent / "search_original.json"
    target.write_text("\n".join(lines[:4]) + "\n")
    original.write_text("\n".join(lines[4:]) + "\n")
    return {"experts": experts, "target": target, "original": original}


def write_recipe(folder: Path, inputs: dict, **extra) -> Path:
    recipe = {
        "method": "search",
        "base_model": str(GENERALIST),
        "models": [str(e) for e in inputs["experts"]],
        "dev": {"sets": {"target": str(inputs["target"])}, "original": {"orig": str(inputs["original"])},
                "batch_size": 4, "device": "cpu"},
        "max_forgetting_pct": BUDGET,
        "trials": 6,
        "exclude": ["preprocessor.*"],
        "output": str(folder / "search.nemo"),
        "hash_inputs": False,
        **extra,
    }
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def trial_log(folder: Path) -> dict:
    return json.loads((folder / "search.nemo.trials.json").read_text())


def test_the_written_merge_keeps_the_budget_on_dev_as_asr_merge_eval_measures_it(tmp_path, search_inputs):
    from nemo_merge.evaluate import evaluate
    from nemo_merge.nemo_io import read_nemo_provenance

    result = run_recipe(write_recipe(tmp_path, search_inputs), progress=False)
    log = trial_log(tmp_path)
    trials = log["trials"]
    assert len(trials) == 6 and [t["baseline"] for t in trials[:3]] == ["AoDE", "TIES", "task arithmetic"]
    assert any(not t["feasible"] for t in trials)  # the budget turned some merges away
    chosen = trials[log["chosen"]]
    assert chosen["feasible"] and chosen["forgetting_pct"] <= BUDGET
    assert chosen["objective"] == min(t["objective"] for t in trials if t["feasible"])
    provenance = read_nemo_provenance(result.output)["recipe"]["search"]
    assert provenance["trial"] == chosen["number"] and provenance["dev_wer"]["target"] == chosen["dev"]["target"]["wer"]

    # `asr-merge eval` of the written merge on the dev sets: the trial's numbers, within the budget
    report, _ = evaluate({
        "models": [{"name": "generalist", "model": str(GENERALIST)}, {"name": "search", "model": str(result.output)}],
        "manifests": {"target": str(search_inputs["target"]), "orig": str(search_inputs["original"])},
        "forgetting_sets": ["orig"],
        "batch_size": 4,
        "device": "cpu",
        "cache": False,
        "output_dir": str(tmp_path / "eval"),
    }, progress=False)
    generalist, searched = report["models"]
    assert generalist["wer"]["orig"] == pytest.approx(log["reference"]["dev"]["orig"]["wer"])
    assert searched["wer"]["target"] == pytest.approx(chosen["dev"]["target"]["wer"])
    assert searched["forgetting_pct"] == pytest.approx(chosen["forgetting_pct"]) and searched["forgetting_pct"] <= BUDGET
    assert (tmp_path / "search.nemo.pareto.png").stat().st_size > 10_000


def test_an_impossible_budget_writes_nothing_unless_the_least_forgetting_trial_is_asked_for(tmp_path, search_inputs, capsys):
    from nemo_merge.nemo_io import read_nemo_provenance

    recipe = write_recipe(tmp_path, search_inputs, max_forgetting_pct=-100.0, trials=3)
    assert main(["search", str(recipe), "-q"]) == 2
    error = capsys.readouterr().err
    assert "asr-merge: error:" in error and "kept forgetting within max_forgetting_pct -100" in error
    assert "the least forgetting reached was" in error and "nothing was written" in error
    assert not (tmp_path / "search.nemo").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    trials = trial_log(tmp_path)["trials"]
    least = min(trials, key=lambda t: (t["forgetting_pct"], t["objective"], t["number"]))

    assert main(["search", str(recipe), "if_infeasible=least_forgetting", "-q"]) == 0  # the same study: no new trial
    provenance = read_nemo_provenance(tmp_path / "search.nemo")["recipe"]["search"]
    assert provenance["trial"] == least["number"] and provenance["within_budget"] is False
    assert trial_log(tmp_path)["outcome"] == "least forgetting (over budget)" and len(trial_log(tmp_path)["trials"]) == 3


@pytest.mark.slow
def test_nemos_hydra_script_resumes_a_study_where_it_stopped(tmp_path, search_inputs):
    recipe = write_recipe(tmp_path, search_inputs, trials=3, if_infeasible="least_forgetting")
    run_recipe(recipe, progress=False)
    first = trial_log(tmp_path)["trials"]
    done = subprocess.run([sys.executable, "-m", "nemo_merge.merge", f"--config-path={tmp_path}", "--config-name=search",
                           "trials=5"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "of 5 (" in done.stdout + done.stderr  # the summary: trial k of 5
    trials = trial_log(tmp_path)["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3, 4] and trials[:3] == first  # 2 new trials, 3 read back


def test_a_bad_space_is_refused_before_nemo_is_even_imported(tmp_path, search_inputs):
    recipe = write_recipe(tmp_path, search_inputs)
    code = ("import sys; from merge_core.app.cli import main; "
            f"rc = main(['search', {str(recipe)!r}, 'space.weights=[0, 0]', '-q']); "
            "print(rc, 'nemo' in sys.modules, 'optuna' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert "space.weights [0.0, 0.0] gives every expert weight 0" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.yaml"]

