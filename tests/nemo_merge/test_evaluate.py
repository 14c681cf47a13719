"""Forgetting evaluation of real NeMo models on NeMo manifests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merge_core.checkpoint.provenance import file_sha256
from merge_core.errors import ManifestError
from merge_core.evaluation.runner import EvalConfig, run_evaluation
from merge_core.evaluation.manifests import read_nemo_manifest

pytest.importorskip("nemo.collections.asr")
from nemo_merge.evaluate import NemoBackend, evaluate  # noqa: E402

RAW = {"lowercase": False, "strip_punctuation": False}  # NeMo's word_error_rate normalises nothing


@pytest.fixture(scope="module")
def babbler(tmp_path_factory, tiny_nemo_base) -> Path:
    """The tiny base with the CTC blank pushed down, so its greedy transcripts are
    non-empty word salad: a WER comparison then has real errors of every kind."""
    from nemo.collections.asr.models import ASRModel

    model = ASRModel.restore_from(str(tiny_nemo_base), map_location="cpu")
    with torch.no_grad():
        bias = model.decoder.decoder_layers[0].bias
        bias[-1] = -30.0
        bias[:-1] = torch.linspace(-1.0, 1.0, bias.numel() - 1)
    path = tmp_path_factory.mktemp("babbler") / "babbler.nemo"
    model.save_to(str(path))
    return path


@pytest.fixture(scope="module")
def test_sets(tmp_path_factory, nemo_audio_manifest) -> dict[str, Path]:
    """The fixture manifest split into LibriSpeech-named sets and a domain set."""
    lines = nemo_audio_manifest.read_text().splitlines()
    folder = nemo_audio_manifest.parent
    sets = {"noise": lines[:2], "test_clean": lines[2:5], "test_other": lines[5:]}
    paths = {}
    for name, chunk in sets.items():
        paths[name] = folder / f"{name}.json"
        paths[name].write_text("\n".join(chunk) + "\n")
    return paths


def config(tmp_path, models, sets, **extra) -> dict:
    return {
        "models": [{"name": n, "model": str(p)} for n, p in models.items()],
        "manifests": {k: str(v) for k, v in sets.items()},
        "normalization": RAW,
        "batch_size": 4,
        "output_dir": str(tmp_path / "eval"),
        "cache_dir": str(tmp_path / "cache"),
        **extra,
    }


def nemo_reference_wer(path: Path, manifest: Path) -> tuple[float, list[str]]:
    """NeMo's own way: restore, transcribe, word_error_rate."""
    from nemo.collections.asr.metrics.wer import word_error_rate
    from nemo.collections.asr.models import ASRModel

    model = ASRModel.restore_from(str(path), map_location="cpu").eval()
    utterances = read_nemo_manifest(manifest)
    hyps = [h.text for h in model.transcribe([str(u.audio) for u in utterances], batch_size=4, num_workers=0, verbose=False)]
    return word_error_rate(hyps, [u.text for u in utterances]), hyps


def test_eval_wer_equals_nemo_transcribe_and_word_error_rate(tmp_path, tiny_nemo_base, babbler, test_sets):
    report, files = evaluate(config(tmp_path, {"generalist": tiny_nemo_base, "babbler": babbler}, test_sets), progress=False)
    from nemo.collections.asr.metrics.wer import word_error_rate_detail

    rows = {m["name"]: m for m in report["models"]}
    for name, manifest in test_sets.items():
        want, hyps = nemo_reference_wer(babbler, manifest)
        assert any(hyps), "the babbler must say something"
        assert rows["babbler"]["wer"][name] == pytest.approx(100 * want, abs=1e-9)
        # transcripts as NeMo's transcribe_speech.py writes them: each manifest entry with its pred_text
        written = [json.loads(line) for line in (files["json"].parent / rows["babbler"]["transcripts"][name]).open()]
        entries = [json.loads(line) for line in manifest.read_text().splitlines()]
        assert written == [{**entry, "pred_text": hyp} for entry, hyp in zip(entries, hyps)]
        # per-utterance counts: NeMo's own per-utterance detail, utterance by utterance
        counts = rows["babbler"]["per_utterance"][name]
        for i, (entry, hyp) in enumerate(zip(entries, hyps)):
            wer, words, *_ = word_error_rate_detail([hyp], [entry["text"]])
            assert report["utterance_words"][name][i] == words
            assert sum(counts[k][i] for k in ("substitutions", "deletions", "insertions")) == round(wer * words)
    assert rows["babbler"]["checkpoint"] == str(babbler) and rows["babbler"]["weights_digest"] == file_sha256(babbler)
    assert rows["generalist"]["delta"]["wer_ci"] == dict.fromkeys(test_sets, [0.0, 0.0])
    lo, hi = rows["babbler"]["forgetting_ci"]
    assert lo <= rows["babbler"]["forgetting_pct"] <= hi
    stats = rows["babbler"]["stats"]
    pooled = (stats["test_clean"]["substitutions"] + stats["test_clean"]["deletions"] + stats["test_clean"]["insertions"]
              + stats["test_other"]["substitutions"] + stats["test_other"]["deletions"] + stats["test_other"]["insertions"])
    words = stats["test_clean"]["words"] + stats["test_other"]["words"]
    assert rows["babbler"]["pooled_reference_wer"] == pytest.approx(100 * pooled / words)
    assert rows["generalist"]["forgetting_pct"] == 0.0
    ref = rows["generalist"]["pooled_reference_wer"]
    assert rows["babbler"]["forgetting_pct"] == pytest.approx(100 * (rows["babbler"]["pooled_reference_wer"] - ref) / ref)
    assert rows["babbler"]["average_wer"] == pytest.approx(sum(rows["babbler"]["wer"].values()) / 3)
    assert json.loads(files["json"].read_text()) == json.loads(json.dumps(report))
    table = files["md"].read_text()
    assert "| babbler |" in table and "test_clean" in table
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class CountingBackend(NemoBackend):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def transcribe(self, spec, utterances, config):
        self.calls += 1
        return super().transcribe(spec, utterances, config)


def test_each_model_and_manifest_is_transcribed_once(tmp_path, tiny_nemo_base, babbler, test_sets):
    cfg = EvalConfig.from_mapping(config(tmp_path, {"generalist": tiny_nemo_base, "babbler": babbler}, test_sets))
    first, second = CountingBackend(), CountingBackend()
    report1, files = run_evaluation(first, cfg, progress=False)
    transcripts = {p: p.read_text() for p in files["transcripts"].rglob("*.json")}
    report2, _ = run_evaluation(second, cfg, progress=False)
    assert first.calls == 6 and second.calls == 0
    assert report1 == report2
    # the cached hypotheses give the same transcripts, one file per model and set
    assert len(transcripts) == 6 and {p: p.read_text() for p in files["transcripts"].rglob("*.json")} == transcripts
    more = EvalConfig.from_mapping(config(tmp_path, {"babbler": babbler}, test_sets, max_utterances=1))
    third = CountingBackend()
    run_evaluation(third, more, progress=False)
    assert third.calls == 3  # a different dev subset is a different evaluation


def test_hydra_evaluate_and_asr_merge_eval(tmp_path, tiny_nemo_base, test_sets):
    cfg = config(tmp_path, {"generalist": tiny_nemo_base}, test_sets)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    hydra = subprocess.run(
        [sys.executable, "-m", "nemo_merge.evaluate", "--config-path", str(tmp_path), "--config-name", "eval", f"output_dir={tmp_path / 'hydra'}"],
        capture_output=True, text=True,
    )
    assert hydra.returncode == 0, hydra.stderr[-3000:]
    from merge_core.app.cli import main

    assert main(["eval", str(tmp_path / "eval.yaml"), f"output_dir={tmp_path / 'cli'}", "-q"]) == 0
    a = json.loads((tmp_path / "hydra" / "report.json").read_text())
    b = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert a == b and a["models"][0]["name"] == "generalist"


def write_manifest(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def test_bad_manifests_fail_before_any_model_loads(tmp_path, tiny_nemo_base, nemo_audio_manifest):
    good = [json.loads(line) for line in nemo_audio_manifest.read_text().splitlines()]
    audio = str(nemo_audio_manifest.parent / good[1]["audio_filepath"])
    cases = {
        "no_text.json": ([{"audio_filepath": audio, "duration": 1.0}], r"no_text.json:1: entry lacks 'text'"),
        "no_audio.json": ([{"audio_filepath": str(tmp_path / "gone.wav"), "text": "a"}], "gone.wav' does not exist"),
        "empty.json": ([], "empty.json: manifest holds no utterances"),
    }
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file")
    cases["broken.json"] = ([{"audio_filepath": str(broken), "text": "a"}], "broken.wav' is unreadable")
    for name, (entries, message) in cases.items():
        manifest = write_manifest(tmp_path / name, entries)
        cfg = config(tmp_path, {"generalist": tiny_nemo_base}, {"test_clean": manifest, "test_other": manifest})
        with pytest.raises(ManifestError, match=message):
            evaluate(cfg, progress=False)
        assert not (tmp_path / "eval").exists()


def test_empty_reference_is_skipped_and_counted(tmp_path, tiny_nemo_base, nemo_audio_manifest):
    entries = [json.loads(line) for line in nemo_audio_manifest.read_text().splitlines()[:3]]
    for e in entries:
        e["audio_filepath"] = str(nemo_audio_manifest.parent / e["audio_filepath"])
    entries[1]["text"] = " "
    manifest = write_manifest(tmp_path / "m.json", entries)
    with pytest.warns(UserWarning, match="skipped 1 utterance"):
        report, _ = evaluate(config(tmp_path, {"g": tiny_nemo_base}, {"test_clean": manifest, "test_other": manifest}), progress=False)
    stats = report["models"][0]["stats"]["test_clean"]
    assert stats["skipped_empty"] == 1 and stats["utterances"] == 2
