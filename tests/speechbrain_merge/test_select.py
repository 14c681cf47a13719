"""Greedy soups of real SpeechBrain ``CKPT+`` folders, decoded for real: the shipped
generalist, a copy with one encoder layer destroyed, and a plain copy, on espeak-ng speech."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from merge_core.checkpoint import open_checkpoint
from tests.checkpoint_helpers import scaled_copy
from merge_core.recipes.greedy_soup import load_soup_recipe, run_greedy_soup
from speechbrain_merge.checkpoint_io import META_FILE
from tests.speechbrain_merge.conftest import INFERENCE_HPARAMS

pytest.importorskip("speechbrain")

REPO = Path(__file__).resolve().parents[2]
GENERALIST = REPO / "models" / "speechbrain_generalist" / "CKPT+generalist"
DESTROYED = "model.1.encoder.layers.1."


def dev_options(sb_data) -> dict:
    """What ``asr-merge eval`` needs to decode the shipped generalist's checkpoints."""
    generalist = json.loads((GENERALIST.parent / "generalist.json").read_text())["hparams"]
    tokenizer = next((GENERALIST.parent / "tokenizer").glob("*.model"))
    return {
        "hparams": str(INFERENCE_HPARAMS),
        "hparams_overrides": {**generalist, "tokenizer_file": str(tokenizer)},
        "data_root": str(sb_data.data_root),
        "batch_size": 4,
        "device": "cpu",
    }


def test_harmful_rejected_neutral_not_kept_and_soup_written(tmp_path, sb_data):
    from speechbrain_merge.evaluate import evaluate

    candidates = [
        GENERALIST,
        scaled_copy(GENERALIST, tmp_path / "CKPT+destroyed", DESTROYED),
        Path(shutil.copytree(GENERALIST, tmp_path / "CKPT+copy")),  # averages to the generalist: the same WER
    ]
    options = dev_options(sb_data)
    recipe = {
        "method": "greedy_soup",
        "models": [str(c) for c in candidates],
        "dev": {"manifest": str(sb_data.test_clean_csv), "max_utterances": 6, "log": str(tmp_path / "trials.json"), **options},
        "output": str(tmp_path / "CKPT+soup"),
        "hash_inputs": False,
    }
    recipe_file = tmp_path / "soup.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    result = run_greedy_soup(load_soup_recipe(recipe_file), progress=False)

    trials = json.loads((tmp_path / "trials.json").read_text())["trials"]
    assert [(t["index"], t["kept"], t["members"]) for t in trials] == [(0, True, 1), (1, False, 1), (2, False, 1)]
    generalist_wer = trials[0]["wer"]
    assert trials[1]["wer"] > generalist_wer + 0.2  # the destroyed layer clearly hurts
    assert trials[2]["wer"] == generalist_wer  # a tie is not a strict drop: Algorithm 1 rejects it

    # the written soup is the kept members' average (the generalist alone), normalizer copied
    with open_checkpoint(result.output) as soup, open_checkpoint(GENERALIST) as generalist:
        assert soup.keys() == generalist.keys()
        for name in soup.keys():
            assert torch.equal(soup.get(name), generalist.get(name)), name
    assert (result.output / "normalizer.ckpt").read_bytes() == (GENERALIST / "normalizer.ckpt").read_bytes()
    assert "asr_merge" in yaml.safe_load((result.output / META_FILE).read_text())

    # the cached waveforms score as `asr-merge eval` does with the same batches
    report, _ = evaluate({
        **options,
        "models": [{"name": "soup", "model": str(result.output)}],
        "manifests": {"dev": str(sb_data.test_clean_csv)},
        "forgetting_sets": ["dev"],
        "max_utterances": 6,
        "cache": False,
        "output_dir": str(tmp_path / "eval"),
    }, progress=False)
    assert report["models"][0]["wer"]["dev"] == pytest.approx(100 * generalist_wer)


def test_speechbrains_merge_script_runs_a_greedy_soup_too(tmp_path, sb_data):
    """The toolkit-style script comes through the same front door as ``asr-merge merge``."""
    from speechbrain_merge.merge import main

    copy = shutil.copytree(GENERALIST, tmp_path / "CKPT+copy")
    recipe = {
        "method": "greedy_soup",
        "models": [str(GENERALIST), str(copy)],
        "dev": {"manifest": str(sb_data.test_clean_csv), "max_utterances": 4, **dev_options(sb_data)},
        "output": str(tmp_path / "CKPT+soup"),
    }
    (tmp_path / "soup.yaml").write_text(yaml.safe_dump(recipe))
    assert main([str(tmp_path / "soup.yaml"), "--hash_inputs=false"]) == 0
    trials = json.loads((tmp_path / "CKPT+soup.trials.json").read_text())["trials"]
    assert [t["kept"] for t in trials] == [True, False]  # the copy ties: not a strict drop
    assert (tmp_path / "CKPT+soup" / META_FILE).is_file()
