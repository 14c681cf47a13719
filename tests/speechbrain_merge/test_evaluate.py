"""Forgetting evaluation of real SpeechBrain checkpoints on SpeechBrain CSV manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from merge_core import Recipe, merge
from merge_core.app.cli import main as asr_merge
from merge_core.errors import EvaluationError, ManifestError
from merge_core.recipes.config import load_yaml_config
from tests.speechbrain_merge.conftest import (
    CSV_COLUMNS,
    INFERENCE_HPARAMS,
    SENTENCES,
    read_csv,
    tokenizer_file,
    write_csv,
)

pytest.importorskip("speechbrain")
from speechbrain_merge.evaluate import evaluate, split_config  # noqa: E402
from speechbrain_merge.evaluate import main as evaluate_main  # noqa: E402
from speechbrain_merge.recipes.train_ctc import build_brain, csv_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SETS = ("test_clean", "test_other")
BATCH_SIZE = 4


@pytest.fixture(scope="module")
def merged(tmp_path_factory, sb_generalist, sb_experts) -> Path:
    """``save/CKPT+ties``: the TIES merge of the two experts."""
    out = tmp_path_factory.mktemp("sb_eval_ties") / "save" / "CKPT+ties"
    recipe = {
        "method": "ties",
        "base_model": str(sb_generalist.last),
        "models": [str(run.last) for run in sb_experts],
        "parameters": {"density": 0.5},
        "output": str(out),
    }
    merge(Recipe.from_mapping(recipe), progress=False)
    return out


@pytest.fixture(scope="module")
def inference_folder(tmp_path_factory, sb_generalist) -> Path:
    """The generalist as published for ``from_hparams(source=...)``: hyperparams.yaml
    (tokenizer path filled in) beside the checkpoint's files."""
    folder = tmp_path_factory.mktemp("sb_inference") / "generalist"
    shutil.copytree(sb_generalist.last, folder)
    text = INFERENCE_HPARAMS.read_text().replace("!PLACEHOLDER", str(tokenizer_file(sb_generalist)), 1)
    (folder / "hyperparams.yaml").write_text(text)
    return folder


def eval_config(sb_data, sb_generalist, models: list[dict[str, str]], out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "hparams": str(INFERENCE_HPARAMS),
        "hparams_overrides": {"tokenizer_file": str(tokenizer_file(sb_generalist))},
        "data_root": str(sb_data.data_root),
        "models": models,
        "manifests": {"test_clean": str(sb_data.test_clean_csv), "test_other": str(sb_data.test_other_csv)},
        "batch_size": BATCH_SIZE,
        "cache_dir": str(out / "cache"),
        "output_dir": str(out / "report"),
        **extra,
    }


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, sb_data, sb_generalist, merged, inference_folder) -> Path:
    """``asr-merge eval CONFIG toolkit=speechbrain`` on the generalist (as a checkpoint
    folder and as a published folder) and the TIES merge; the folder it wrote."""
    out = tmp_path_factory.mktemp("sb_eval")
    models = [
        {"name": "generalist", "model": str(sb_generalist.last)},
        {"name": "ties", "model": str(merged)},
        {"name": "published", "pretrained_name": str(inference_folder)},
    ]
    config = out / "eval.yaml"
    config.write_text(yaml.safe_dump(eval_config(sb_data, sb_generalist, models, out)))
    assert asr_merge(["eval", str(config), "toolkit=speechbrain", "-q"]) == 0
    return out / "report"


@pytest.fixture(scope="module")
def report(report_dir) -> dict[str, Any]:
    """The report.json of :func:`report_dir`."""
    return json.loads((report_dir / "report.json").read_text())


def stats(report: dict[str, Any], model: str, test_set: str) -> dict[str, Any]:
    return next(m for m in report["models"] if m["name"] == model)["stats"][test_set]


def speechbrain_wer(sb_hparams, sb_generalist, checkpoint: Path, csv: Path, work: Path):
    """The recipe's own evaluation: ``Brain.evaluate`` recovers ``checkpoint`` (the
    latest in its save folder), decodes ``csv`` in the evaluation's batches (padding
    changes the shorter utterances' features) and scores with ``ErrorRateStats``."""
    hparams = sb_hparams(
        work, save_folder=str(checkpoint.parent), tokenizer_folder=str(tokenizer_file(sb_generalist).parent)
    )
    brain = build_brain(hparams, {"device": "cpu", "noprogressbar": True})
    assert brain.checkpointer.find_checkpoint().path == checkpoint
    batches = {"batch_size": BATCH_SIZE}
    brain.evaluate(csv_dataset(str(csv), hparams, brain.tokenizer), progressbar=False, test_loader_kwargs=batches)
    return brain.wer_metric


@pytest.mark.parametrize("test_set", SETS)
@pytest.mark.parametrize("model", ["generalist", "ties"])
def test_wer_equals_speechbrains_error_rate_stats(
    tmp_path, report, report_dir, sb_data, sb_hparams, sb_generalist, merged, model, test_set
):
    checkpoint = {"generalist": sb_generalist.last, "ties": merged}[model]
    csv = {"test_clean": sb_data.test_clean_csv, "test_other": sb_data.test_other_csv}[test_set]
    metric = speechbrain_wer(sb_hparams, sb_generalist, checkpoint, csv, tmp_path)
    hypotheses = [s["hyp_tokens"] for s in metric.scores]
    assert sum(h != [""] for h in hypotheses) >= len(hypotheses) // 2, f"mostly empty hypotheses: {hypotheses}"

    theirs, ours = metric.summarize(), stats(report, model, test_set)
    assert ours["words"] == theirs["num_scored_tokens"] and ours["utterances"] == theirs["num_scored_sents"]
    assert (ours["substitutions"], ours["deletions"], ours["insertions"]) == (
        theirs["substitutions"],
        theirs["deletions"],
        theirs["insertions"],
    )
    assert ours["wer"] == pytest.approx(theirs["WER"])
    # the transcripts CSV, utterance by utterance: SpeechBrain's own per-utterance counts
    row = next(m for m in report["models"] if m["name"] == model)
    written = read_csv(report_dir / row["transcripts"][test_set])
    assert list(written[0]) == ["ID", "wrd", "hypothesis", "substitutions", "deletions", "insertions", "words"]
    per_utterance = {s["key"]: s for s in metric.scores}
    assert [r["ID"] for r in written] == [r["ID"] for r in read_csv(csv)] and set(per_utterance) == {r["ID"] for r in written}
    for r in written:
        theirs = per_utterance[r["ID"]]
        assert r["hypothesis"].split() == [t for t in theirs["hyp_tokens"] if t]
        assert [int(r[k]) for k in ("substitutions", "deletions", "insertions", "words")] == [
            theirs["substitutions"], theirs["deletions"], theirs["insertions"], theirs["num_ref_tokens"]]


def test_a_published_folder_decodes_like_its_checkpoint_folder(report):
    for test_set in SETS:
        assert stats(report, "published", test_set) == stats(report, "generalist", test_set)


def test_report_has_every_model_and_set(report):
    assert report["sets"] == list(SETS) and report["reference_model"] == "generalist"
    assert [m["name"] for m in report["models"]] == ["generalist", "ties", "published"]
    assert all(stats(report, m["name"], s)["utterances"] == len(SENTENCES) for m in report["models"] for s in SETS)


def test_speechbrain_style_script_writes_the_report_files(tmp_path, sb_data, sb_generalist, merged):
    config = tmp_path / "eval.yaml"
    models = [{"name": "generalist", "model": str(sb_generalist.last)}, {"name": "ties", "model": str(merged)}]
    config.write_text(yaml.safe_dump(eval_config(sb_data, sb_generalist, models, tmp_path, toolkit="speechbrain")))
    out = tmp_path / "cli_report"
    assert evaluate_main([str(config), f"--output_dir={out}", "--max_utterances=2", "--cache=false"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval.log", "report.json", "report.md", "report.png", "transcripts"]
    assert sorted(p.relative_to(out).as_posix() for p in (out / "transcripts").rglob("*.csv")) == [
        f"transcripts/{m}/{s}.csv" for m in ("generalist", "ties") for s in SETS]
    written = json.loads((out / "report.json").read_text())
    assert stats(written, "ties", "test_other")["utterances"] == 2
    assert "| ties |" in (out / "report.md").read_text()


def bad_csv(kind: str, sb_data, folder: Path) -> tuple[Path, str]:
    """A copy of test_clean.csv with one defect, and the message that must name it."""
    rows, columns = read_csv(sb_data.test_clean_csv), list(CSV_COLUMNS)
    if kind == "missing audio":
        rows[3]["wav"] = "$data_root/LibriSpeech/test-clean/missing.wav"
        message = "missing.wav' does not exist"
    else:
        column = kind.removeprefix("no ")
        columns.remove(column)
        message = f"lacks column\\(s\\) '{column}'"
    return write_csv(folder / "bad.csv", rows, columns), message


@pytest.mark.parametrize("kind", ["no wrd", "no wav", "missing audio"])
def test_bad_manifests_are_refused_before_decoding(tmp_path, sb_data, sb_generalist, kind):
    path, message = bad_csv(kind, sb_data, tmp_path)
    config = eval_config(sb_data, sb_generalist, [{"name": "g", "model": str(sb_generalist.last)}], tmp_path)
    config["manifests"]["test_other"] = str(path)
    with pytest.raises(ManifestError, match=message) as error:
        evaluate(config, progress=False)
    assert str(path) in str(error.value)
    assert not (tmp_path / "report").exists()


def test_placeholders_need_data_root(tmp_path, sb_data, sb_generalist):
    config = eval_config(sb_data, sb_generalist, [{"name": "g", "model": str(sb_generalist.last)}], tmp_path)
    del config["data_root"]
    with pytest.raises(ManifestError, match=rf"{sb_data.test_clean_csv}:2: .* needs a value for \$data_root"):
        evaluate(config, progress=False)
    assert not (tmp_path / "report").exists()


def test_a_model_that_is_not_a_checkpoint_folder_is_refused(tmp_path, sb_data, sb_generalist):
    config = eval_config(sb_data, sb_generalist, [{"name": "g", "model": str(sb_generalist.last.parent)}], tmp_path)
    with pytest.raises(EvaluationError, match="model 'g': .*a Checkpointer save folder holding 3 checkpoint"):
        evaluate(config, progress=False)
    assert not (tmp_path / "report").exists()


def test_hparams_that_do_not_fit_the_checkpoint_are_refused(tmp_path, sb_data, sb_generalist):
    """The pretrainer would only log the unused layer and decode anyway."""
    config = eval_config(sb_data, sb_generalist, [{"name": "g", "model": str(sb_generalist.last)}], tmp_path)
    config["hparams_overrides"]["num_encoder_layers"] = 1
    with pytest.raises(
        EvaluationError,
        match=r"model 'g': .*model.ckpt does not fit the hparams' 'model' .*unexpected \['1.encoder.layers.1",
    ):
        evaluate(config, progress=False)
    assert not (tmp_path / "report").exists()


def test_example_config_is_valid(monkeypatch):
    monkeypatch.chdir(REPO)  # its paths are relative to the repository, as the README runs it
    options, config = split_config(load_yaml_config("configs/speechbrain/eval.yaml"))
    assert options.hparams == REPO / "configs" / "speechbrain" / "generalist_inference.yaml"
    assert config.toolkit == "speechbrain" and [m.name for m in config.models] == ["generalist", "FT accented", "FT noisy", "AoDE", "TIES"]
