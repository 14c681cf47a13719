"""Greedy soups of real ``.nemo`` models, decoded for real: the shipped generalist, a copy
of it with one encoder layer destroyed, and a plain copy, on espeak-ng speech."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from merge_core.checkpoint import open_checkpoint
from tests.checkpoint_helpers import scaled_copy
from merge_core.recipes.greedy_soup import load_soup_recipe, run_greedy_soup

pytest.importorskip("nemo.collections.asr")

REPO = Path(__file__).resolve().parents[2]
GENERALIST = REPO / "models" / "nemo_generalist.nemo"
DESTROYED = "encoder.layers.1."


def test_harmful_rejected_neutral_not_kept_and_soup_written(tmp_path, nemo_audio_manifest):
    from nemo_merge.evaluate import evaluate

    candidates = [
        GENERALIST,
        scaled_copy(GENERALIST, tmp_path / "destroyed.nemo", DESTROYED),
        Path(shutil.copyfile(GENERALIST, tmp_path / "copy.nemo")),  # averages to the generalist: the same WER
    ]
    recipe_file = tmp_path / "soup.yaml"
    recipe_file.write_text(
        "method: greedy_soup\n"
        f"models: [{', '.join(str(c) for c in candidates)}]\n"
        f"dev: {{manifest: {nemo_audio_manifest}, max_utterances: 6, batch_size: 4, device: cpu, log: {tmp_path / 'trials.json'}}}\n"
        f"output: {tmp_path / 'soup.nemo'}\n"
        "hash_inputs: false\n"
    )
    result = run_greedy_soup(load_soup_recipe(recipe_file), progress=False)

    trials = json.loads((tmp_path / "trials.json").read_text())["trials"]
    assert [(t["index"], t["candidate"], t["kept"], t["members"]) for t in trials] == [
        (0, str(candidates[0]), True, 1), (1, str(candidates[1]), False, 1), (2, str(candidates[2]), False, 1)
    ]
    generalist_wer = trials[0]["wer"]
    assert trials[1]["wer"] > generalist_wer + 0.2  # the destroyed layer clearly hurts
    assert trials[2]["wer"] == generalist_wer  # a tie is not a strict drop: Algorithm 1 rejects it
    assert all(t["best_wer"] == generalist_wer for t in trials)

    # the written soup is the average of the kept members (the generalist alone)
    with open_checkpoint(result.output) as soup, open_checkpoint(GENERALIST) as generalist:
        assert soup.keys() == generalist.keys()
        for name in soup.keys():
            assert torch.equal(soup.get(name), generalist.get(name)), name

    # the cached-feature decoding scores as `asr-merge eval` does on the same utterances
    report, _ = evaluate({
        "models": [{"name": "soup", "model": str(result.output)}],
        "manifests": {"dev": str(nemo_audio_manifest)},
        "forgetting_sets": ["dev"],
        "max_utterances": 6,
        "batch_size": 4,
        "device": "cpu",
        "cache": False,
        "output_dir": str(tmp_path / "eval"),
    }, progress=False)
    assert report["models"][0]["wer"]["dev"] == pytest.approx(100 * generalist_wer)


def test_features_are_recomputed_when_a_trial_changes_the_preprocessor(tmp_path, nemo_audio_manifest):
    from merge_core.recipes.greedy_soup import DevSet
    from nemo_merge.select import NemoDevEvaluator

    dev = DevSet(manifest=nemo_audio_manifest, log=tmp_path / "log.json", max_utterances=4, batch_size=4, device="cpu")
    with open_checkpoint(GENERALIST) as reader:
        state = {name: reader.get(name) for name in reader.keys()}
        evaluator = NemoDevEvaluator(reader, dev)
        wer, cached = evaluator(state), evaluator.features
        assert evaluator(state) == wer and evaluator.features is cached  # the same weights: no recomputation
        fb = "preprocessor.featurizer.fb"
        evaluator({**state, fb: torch.flip(state[fb], dims=[1])})  # mel bands reversed: other features
        assert not torch.equal(evaluator.features[0][0], cached[0][0])
        assert evaluator(state) == wer and torch.equal(evaluator.features[0][0], cached[0][0])


def test_nemos_hydra_merge_script_runs_a_greedy_soup_too(tmp_path, nemo_audio_manifest):
    """The toolkit-style script comes through the same front door as ``asr-merge merge``."""
    import subprocess
    import sys

    copy = shutil.copyfile(GENERALIST, tmp_path / "copy.nemo")
    (tmp_path / "my_soup.yaml").write_text(
        "method: greedy_soup\n"
        f"models: [{GENERALIST}, {copy}]\n"
        f"dev: {{manifest: {nemo_audio_manifest}, max_utterances: 4, batch_size: 4, device: cpu}}\n"
        f"output: {tmp_path / 'soup.nemo'}\n"
    )
    done = subprocess.run([sys.executable, "-m", "nemo_merge.merge", f"--config-path={tmp_path}", "--config-name=my_soup",
                           "+hash_inputs=false"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "greedy soup of 1 of 2 candidates" in done.stdout + done.stderr
    trials = json.loads((tmp_path / "soup.nemo.trials.json").read_text())["trials"]
    assert [t["kept"] for t in trials] == [True, False]  # the copy ties: not a strict drop
