"""Forgetting-budget searches of real SpeechBrain ``CKPT+`` folders, decoded for real: the
shipped generalist and two experts made from it (one encoder layer scaled, the output
layer scaled), on espeak-ng speech: ``test_other`` is the target domain, ``test_clean``
the original one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from merge_core.recipes import run_recipe
from tests.checkpoint_helpers import scaled_copy
from tests.speechbrain_merge.test_select import GENERALIST, dev_options

pytest.importorskip("speechbrain")
pytest.importorskip("optuna")

BUDGET = 5.0  # % forgetting


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("sb_search")
    return [scaled_copy(GENERALIST, folder / "CKPT+encoder", "model.1.encoder.layers.1.", 1.3),
            scaled_copy(GENERALIST, folder / "CKPT+output", "model.2.", 1.5)]


def write_recipe(folder: Path, sb_data, experts: list[Path], **extra) -> Path:
    options = dev_options(sb_data)
    recipe = {
        "method": "search",
        "base_model": str(GENERALIST),
        "models": [str(e) for e in experts],
        "dev": {"sets": {"other": str(sb_data.test_other_csv)}, "original": {"clean": str(sb_data.test_clean_csv)},
                **options},
        "max_forgetting_pct": BUDGET,
        "trials": 6,
        "include": ["model.*"],
        "output": str(folder / "CKPT+search"),
        "hash_inputs": False,
        **extra,
    }
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def trial_log(folder: Path) -> dict:
    return json.loads((folder / "CKPT+search.trials.json").read_text())


def test_the_written_merge_keeps_the_budget_on_dev_as_asr_merge_eval_measures_it(tmp_path, sb_data, experts):
    from speechbrain_merge.evaluate import evaluate

    result = run_recipe(write_recipe(tmp_path, sb_data, experts, sampler="nsga2"), progress=False)
    log = trial_log(tmp_path)
    trials = log["trials"]
    assert len(trials) == 6 and [t["baseline"] for t in trials[:3]] == ["AoDE", "TIES", "task arithmetic"]
    assert any(not t["feasible"] for t in trials)  # the budget turned some merges away
    chosen = trials[log["chosen"]]
    assert chosen["feasible"] and chosen["forgetting_pct"] <= BUDGET
    assert chosen["objective"] == min(t["objective"] for t in trials if t["feasible"])
    assert (result.output / "normalizer.ckpt").read_bytes() == (GENERALIST / "normalizer.ckpt").read_bytes()

    options = dev_options(sb_data)
    report, _ = evaluate({
        **options,
        "models": [{"name": "generalist", "model": str(GENERALIST)}, {"name": "search", "model": str(result.output)}],
        "manifests": {"other": str(sb_data.test_other_csv), "clean": str(sb_data.test_clean_csv)},
        "forgetting_sets": ["clean"],
        "cache": False,
        "output_dir": str(tmp_path / "eval"),
    }, progress=False)
    generalist, searched = report["models"]
    assert generalist["wer"]["clean"] == pytest.approx(log["reference"]["dev"]["clean"]["wer"])
    assert searched["wer"]["other"] == pytest.approx(chosen["dev"]["other"]["wer"])
    assert searched["forgetting_pct"] == pytest.approx(chosen["forgetting_pct"]) and searched["forgetting_pct"] <= BUDGET


def test_speechbrains_merge_script_resumes_a_study_and_says_when_no_trial_meets_the_budget(tmp_path, sb_data, experts,
                                                                                          capsys):
    from speechbrain_merge.merge import main

    recipe = write_recipe(tmp_path, sb_data, experts, trials=3, max_forgetting_pct=-100.0)
    assert main([str(recipe)]) == 2
    assert "the least forgetting reached was" in capsys.readouterr().err
    assert not (tmp_path / "CKPT+search").exists() and [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    first = trial_log(tmp_path)["trials"]
    assert main([str(recipe), "--trials=5", "--if_infeasible=least_forgetting"]) == 0
    trials = trial_log(tmp_path)["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3, 4] and trials[:3] == first  # 2 new trials, 3 read back
    assert (tmp_path / "CKPT+search" / "model.ckpt").is_file()


@pytest.mark.slow
def test_trials_run_in_parallel_processes_on_one_study(tmp_path, sb_data, experts):
    result = run_recipe(write_recipe(tmp_path, sb_data, experts, trials=5, jobs=2), progress=False)
    trials = trial_log(tmp_path)["trials"]
    assert sorted(t["number"] for t in trials) == [0, 1, 2, 3, 4] and all(t["state"] == "COMPLETE" for t in trials)
    assert [t["baseline"] for t in trials[:3]] == ["AoDE", "TIES", "task arithmetic"]
    assert result.output.is_dir()
