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

from merge_core.demo import DEMO_SIZES, TARGETS, DemoPlan, DemoToolkit, ExpertJob, check_claims, expert_jobs

ROWS = 1 + len(TARGETS) + 2 + 7  # pretrained, single fine-tunes, two sequential orders, merges
# toolkit -> (the module that must import, its DemoToolkit)
TOOLKITS = {"nemo": ("nemo.collections.asr", "nemo_merge.demo:NEMO"),
            "speechbrain": ("speechbrain", "speechbrain_merge.demo:SPEECHBRAIN")}


def demo_toolkit(name: str) -> DemoToolkit:
    needed, where = TOOLKITS[name]
    pytest.importorskip(needed)
    module, attribute = where.split(":")
    return getattr(__import__(module, fromlist=[attribute]), attribute)


def run_demo_cli(toolkit: str, out: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ASR_MERGE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "merge_core.cli", "demo", "--smoke", "--toolkit", toolkit, "--out", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module", params=list(TOOLKITS))
def smoke_demo(request, tmp_path_factory):
    toolkit = demo_toolkit(request.param)
    out = tmp_path_factory.mktemp(f"demo-{toolkit.name}")
    cache = tmp_path_factory.mktemp("cache")
    done = run_demo_cli(toolkit.name, out, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return toolkit, out, cache, done


@pytest.mark.parametrize("name", list(TOOLKITS))
def test_sequential_steps_start_from_the_previous_step_and_share_the_single_expert(tmp_path, name):
    toolkit = demo_toolkit(name)
    generalist = tmp_path / "generalist"
    generalist.write_bytes(b"weights")
    plan = DemoPlan(toolkit, Path("/o"), Path("/c"), generalist, DEMO_SIZES["smoke"], 0, TARGETS[0])
    stages = expert_jobs()
    assert len(stages) == len(TARGETS)
    assert len(stages[0]) == 2 * len(TARGETS) and all(len(j.chain) == 1 for j in stages[0])
    full = ExpertJob(TARGETS)
    assert full in stages[-1] and ExpertJob(TARGETS[::-1]) in stages[-1]
    assert plan.init_of(full) == plan.expert_path(ExpertJob(TARGETS[:-1]))
    assert plan.init_of(ExpertJob(TARGETS[:1])) == generalist
    # the key changes with what shapes the expert
    assert plan.expert_path(ExpertJob((TARGETS[0],))) != plan.expert_path(ExpertJob((TARGETS[0],), lora=True))
    assert plan.expert_path(full).name.startswith(toolkit.prefix) and plan.expert_path(full).name.endswith(toolkit.suffix)
    assert plan.manifest(TARGETS[0], "test").parent.parent.name == toolkit.name
    other = DemoPlan(toolkit, Path("/o"), Path("/c"), generalist, DEMO_SIZES["default"], 0, TARGETS[0])
    assert plan.expert_path(full) != other.expert_path(full)
    before = plan.expert_path(full)
    generalist.write_bytes(b"other weights")
    assert plan.expert_path(full) != before


def _row(name, wer, forgetting):
    return {"name": name, "wer": wer, "forgetting_pct": forgetting}


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
    claims = {c["claim"]: c["holds"] for c in check_claims({"models": models}, up)}
    assert claims[f"fine-tuning on {TARGETS[0]} improves {TARGETS[0]} and forgets"] is True
    assert claims[f"fine-tuning on {TARGETS[1]} improves {TARGETS[1]} and forgets"] is False  # it did not forget
    assert claims["sequential fine-tuning forgets more than AoDE"] is False  # sequential b forgot 5% < 10%
    assert claims["AoDE with the original forgets least of the merges"] is True
    assert claims[f"up-weighting {up} moves its WER toward its expert's"] is True


@pytest.mark.slow
def test_smoke_demo_reports_every_row_with_finite_decoded_wers(smoke_demo):
    toolkit, out, _, done = smoke_demo
    report = json.loads((out / "report" / "report.json").read_text())
    assert [m["name"] for m in report["models"]][:2] == ["pretrained", f"FT {TARGETS[0]}"]
    assert len(report["models"]) == ROWS
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
    assert {c["holds"] for c in summary["claims"]} <= {True, False}
    assert "AoDE with orig" in done.stdout and "% Forgetting" in done.stdout


@pytest.mark.slow
def test_smoke_demo_rerun_reuses_the_experts(smoke_demo):
    toolkit, out, cache, _ = smoke_demo
    experts = sorted((out / "experts").glob(f"{toolkit.prefix}*{toolkit.suffix}"))
    assert len(experts) == len(TARGETS) * 2 + 2 * (len(TARGETS) - 1)
    before = {p: p.stat().st_mtime_ns for p in experts}
    done = run_demo_cli(toolkit.name, out, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in experts} == before
    assert f"experts: 0 to train, {len(experts)} reused" in done.stdout
