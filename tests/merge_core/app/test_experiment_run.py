"""The smoke experiment of both toolkits end to end (real fine-tunes, merges and decoding of the
synthetic corpus) on the ``local`` executor, on a local Ray and on a two-node Ray cluster
simulated on this machine: every report identical to the last digit, a Ray worker killed in
the middle of a fine-tune retried, and an interrupted driver (SIGINT, then SIGKILL) resumed
without redoing a finished job."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from merge_core.app.experiment import parse_experiment, run_experiment
from merge_core.app.experiment.smoke import SMOKE_DOMAINS as DOMAINS
from merge_core.app.experiment.smoke import prepare_smoke_data, smoke_experiment

pytestmark = pytest.mark.slow
pytest.importorskip("nemo.collections.asr")
pytest.importorskip("speechbrain")
TOOLKITS = ("nemo", "speechbrain")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepare_smoke_data(tmp_path_factory.mktemp("smoke"))


def wers(storage: Path) -> dict:
    report = json.loads((storage / "report" / "report.json").read_text(encoding="utf-8"))
    return {m["name"]: m["wer"] for m in report["models"]}


def attempts(storage: Path, name_part: str) -> int:
    logs = [p for p in (storage / "logs").glob("*.log") if name_part in p.name]
    return max(p.read_text(encoding="utf-8").count("--- attempt: pid") for p in logs)


@pytest.fixture(scope="module")
def local_reports(corpus, tmp_path_factory) -> dict[str, dict]:
    """Each toolkit's smoke experiment on the local executor; NeMo's through its Hydra form."""
    reports = {}
    for toolkit in TOOLKITS:
        storage = tmp_path_factory.mktemp(f"local-{toolkit}")
        experiment = smoke_experiment(corpus, toolkit, storage)
        if toolkit == "nemo":
            (storage.parent / "smoke_nemo.yaml").write_text(yaml.safe_dump(experiment), encoding="utf-8")
            done = subprocess.run([sys.executable, "-m", "nemo_merge.run", f"--config-path={storage.parent}",
                                   "--config-name=smoke_nemo", "local.jobs=2"], capture_output=True, text=True,
                                  timeout=900)
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            run_experiment(parse_experiment(experiment), live=False)
        reports[toolkit] = wers(storage)
        assert set(reports[toolkit]) == {"pretrained", "FT accented", "FT noisy", "AoDE"}
        assert all(0 <= w <= 150 for row in reports[toolkit].values() for w in row.values())
    return reports


def kill_first_finetune(storage: Path, killed: list[int]) -> None:
    """SIGKILL the worker of the first fine-tune seen running (its pid file), a second in."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not killed:
        for pid_file in (storage / "logs").glob("ft-*.pid") if (storage / "logs").is_dir() else ():
            time.sleep(1.0)
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):  # it ended meanwhile: try the next one
                continue
            killed.append(pid)
            return
        time.sleep(0.2)


def test_a_local_ray_gives_the_local_reports_with_a_killed_worker_retried(corpus, local_reports, tmp_path):
    for toolkit in TOOLKITS:
        storage = tmp_path / toolkit
        killed: list[int] = []
        killer = threading.Thread(target=kill_first_finetune, args=(storage, killed)) if toolkit == "nemo" else None
        if killer:
            killer.start()
        experiment = smoke_experiment(corpus, toolkit, storage, executor="ray", ray={"num_cpus": 2, "max_retries": 2})
        run_experiment(parse_experiment(experiment), live=False)
        if killer:
            killer.join()
            assert killed, "no fine-tune was seen running"
            assert attempts(storage, "ft-") == 2
        assert wers(storage) == local_reports[toolkit]


def test_a_two_node_ray_cluster_gives_the_local_reports(corpus, local_reports, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        for toolkit in TOOLKITS:
            experiment = smoke_experiment(corpus, toolkit, tmp_path / toolkit, executor="ray",
                                          ray={"address": cluster.address})
            run_experiment(parse_experiment(experiment), live=False)
            assert wers(tmp_path / toolkit) == local_reports[toolkit]
        hosts = {line.split(" on ")[1].split(" at ")[0] for p in (tmp_path / "speechbrain" / "logs").glob("*.log")
                 for line in p.read_text(encoding="utf-8").splitlines() if line.startswith("--- attempt")}
        assert hosts  # every job logged where it ran (one host name: both nodes are this machine)
    finally:
        cluster.shutdown()


def alive(pid: int) -> bool:
    """The process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _lines(log: Path, pattern: str) -> int:
    return sum(pattern in line for line in log.read_text(encoding="utf-8").splitlines()) if log.exists() else 0


def _run_until(cmd: list[str], log: Path, pattern: str) -> subprocess.Popen:
    """Start ``cmd`` and return once ``log`` holds one more line containing ``pattern``."""
    count = _lines(log, pattern) + 1
    # SIGINT as a terminal sends it, even where this test runs in the background (which ignores it)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if _lines(log, pattern) >= count:
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{pattern!r} never appeared {count} times in {log}: {proc.stderr.read()[-2000:]}")


def test_an_interrupted_experiment_resumes_without_redoing_a_finished_job(corpus, local_reports, tmp_path):
    storage = tmp_path / "storage"
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(smoke_experiment(corpus, "speechbrain", storage)), encoding="utf-8")
    cmd = [sys.executable, "-m", "merge_core.app.cli", "run", str(path), "-q"]
    log = storage / "experiment.log"
    first = _run_until(cmd, log, " done     finetune")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130 and "interrupted" in first.stderr.read()
    done = {p: p.stat().st_mtime_ns for p in (storage / "experts").iterdir()}
    assert done
    second = _run_until(cmd, log, " done ")
    second.kill()  # SIGKILL: its workers die with it
    second.wait(timeout=60)
    done.update({p: p.stat().st_mtime_ns for p in (storage / "experts").iterdir() if p not in done})
    pids = [int(p.read_text()) for p in (storage / "logs").glob("*.pid")]  # the jobs it was running
    deadline = time.monotonic() + 15
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(alive, pids)), "a worker outlived its SIGKILLed driver"
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in done} == done  # never redone
    finished: set[str] = set()
    for line in log.read_text(encoding="utf-8").splitlines():  # no job started again once done
        _, state, kind, rest = line.split(maxsplit=3)
        job = (kind, re.sub(r" in [\d.]+ s$", "", rest.split(" (log")[0]))
        assert not (state == "running" and job in finished), line
        if state == "done":
            finished.add(job)
    assert len(finished) == len(DOMAINS) + 1 + (len(DOMAINS) + 2)  # experts, their merge, 4 evaluations
    assert wers(storage) == local_reports["speechbrain"]


def test_a_failed_job_stops_only_what_needs_it_and_the_run_names_it(corpus, tmp_path):
    """One domain's training audio is missing: its expert fails, the average of both experts is
    skipped, everything else runs; the command lists the failed job with its log, exit status 2."""
    storage = tmp_path / "storage"
    experiment = smoke_experiment(corpus, "speechbrain", storage)
    broken = tmp_path / "noisy-train.csv"
    rows = Path(experiment["domains"]["noisy"]["train"]).read_text(encoding="utf-8").splitlines()
    broken.write_text("\n".join([rows[0], *(r.replace(".flac", "-missing.flac") for r in rows[1:])]) + "\n",
                      encoding="utf-8")
    experiment["domains"]["noisy"]["train"] = str(broken)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "merge_core.app.cli", "run", str(path), "-q"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "1 job(s) failed (3 skipped as they needed them)" in done.stderr
    failed_log = next(line.split("log ")[1] for line in done.stderr.splitlines() if "finetune FT noisy" in line)
    assert "missing" in Path(failed_log).read_text(encoding="utf-8")  # the toolkit's own error, in the job's log
    assert [p.name.startswith("CKPT+ft-accented") for p in (storage / "experts").iterdir()] == [True]
    assert not (storage / "merged").exists() or not list((storage / "merged").iterdir())
    assert len(list((storage / "evals").iterdir())) == 2  # the generalist and FT accented
