"""Crash injection (issue 19): every command that publishes a documented output is killed
with SIGKILL at random moments, then run again.

Each command goes through :func:`crash_and_rerun`:

1. it runs uninterrupted, as a real subprocess: its duration D, the moment W at which its
   writing starts (an output, or a temporary sibling of one, appears) and its outputs,
   moved aside as the reference (the caches and the work a rerun would resume are
   cleared with them);
2. it is started once per trigger, killed (its whole process group) as soon as the
   trigger sees a given write begin, then n times, each killed at a moment drawn by a
   seeded ``random.Random``: uniformly in one of n/2 strata of [0, D], or of [W, D] where
   the writing happens. The attempts run one after another on what the previous one left,
   as a user rerunning after crashes does. After each, every documented output is absent
   or equal to the reference (never partial), and every cache entry is valid;
3. it runs to completion (or the last attempt did): every output equals the reference,
   and no temporary is left.

"Equal" is byte for byte, except for what records the time of the run (the provenance's
``created``, ``CKPT.yaml``'s ``unixtime``, the mtimes of tar members) and the order of a
``.safetensors`` header's keys (the safetensors library's ``__metadata__`` is a hash map,
iterated in a different order by every process): such headers are compared as JSON.

``ASR_MERGE_CRASH_SEEDS`` (an integer, default 1) multiplies every command's number of
kill moments (``make fuzz``); a failure names the command, the attempt and its moment.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.checkpoint_helpers import scaled_copy
from tests.hardening.crash_jobs import STEPS

REPO = Path(__file__).resolve().parents[2]
# the installed console script, as users run it (the module where it is not installed)
_SCRIPT = Path(sys.executable).with_name("asr-merge")
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "merge_core.app.cli"]
NEMO_GENERALIST = REPO / "models" / "nemo_generalist.nemo"
SB_GENERALIST_DIR = REPO / "models" / "speechbrain_generalist"
SB_GENERALIST = SB_GENERALIST_DIR / "CKPT+generalist"

FACTOR = int(os.environ.get("ASR_MERGE_CRASH_SEEDS", "1"))
# the contract of merge_core.atomic.temp_path: ".<dest name>.tmp-<host>-<pid>-<hex>[suffix]"
TEMPORARY = re.compile(r"^\..+\.tmp-")
# what records the time of a run: provenance "created", CKPT.yaml's unixtime
TIMESTAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:[+-]\d\d:\d\d|Z)?")
UNIXTIME = re.compile(rb"unixtime: [0-9.e+-]+")
POLL = 0.01  # seconds between looks at the output folders during the reference run

pytestmark = pytest.mark.slow


# --- comparing outputs ------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(UNIXTIME.sub(b"unixtime: T", TIMESTAMP.sub(b"T", data))).hexdigest()


def fingerprint(path: Path) -> Any:
    """What must be identical between two runs: a file's bytes (times masked); a ``.nemo``'s
    members, modes and contents (not their mtimes); a ``.safetensors``' header as JSON (the
    safetensors library writes ``__metadata__`` in a per-process hash order) and data bytes;
    a folder's files, hidden ones included."""
    if path.is_dir():
        return {str(p.relative_to(path)): fingerprint(p) for p in sorted(path.rglob("*")) if not p.is_dir()}
    if path.suffix == ".nemo":
        with tarfile.open(path) as tar:
            return [(m.name, m.type, m.mode, _digest(tar.extractfile(m).read()) if m.isfile() else None) for m in tar]
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        size = int.from_bytes(data[:8], "little")
        header = json.loads(TIMESTAMP.sub(b"T", data[8 : 8 + size]))
        return header, _digest(data[8 + size :])
    return _digest(data)


Check = Callable[[Path, Path, bool], None]  # (output, reference, finished): raises AssertionError


def whole(out: Path, ref: Path, finished: bool) -> None:
    """A published result: absent (only while unfinished) or the reference's."""
    if out.exists() or finished:
        assert fingerprint(out) == fingerprint(ref), f"{out} differs from the uninterrupted run's"


def trial_log(out: Path, ref: Path, finished: bool) -> None:
    """The greedy soup's log, rewritten after every trial: its trials a prefix of the reference's."""
    if finished:
        assert json.loads(out.read_text()) == json.loads(ref.read_text())
    elif out.exists():
        log, expected = json.loads(out.read_text()), json.loads(ref.read_text())
        assert log["recipe"] == expected["recipe"]
        assert log["trials"] == expected["trials"][: len(log["trials"])], out


def growing_folder(out: Path, ref: Path, finished: bool) -> None:
    """A folder filled file by file (a corpus, a cache): every file in it is whole and the
    reference's; temporaries are allowed until the run finishes."""
    if finished:
        assert fingerprint(out) == fingerprint(ref), f"{out} differs from the uninterrupted run's"
        return
    if not out.exists():
        return
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if path.is_dir() or any(TEMPORARY.match(part) for part in relative.parts):
            continue
        assert (ref / relative).is_file(), f"{path}: not in the uninterrupted run's output"
        assert fingerprint(path) == fingerprint(ref / relative), f"{path} is partial or differs"


def corpus(out: Path, ref: Path, finished: bool) -> None:
    """``make-corpus``: resumable file by file; ``corpus.json``, written last, marks it complete."""
    growing_folder(out, ref, finished or (out / "corpus.json").exists())


def hash_cache(store: Path) -> None:
    """``sha256.json`` parses, and every digest of a file still as it was when hashed is right."""
    if not store.exists():
        return
    entries = json.loads(store.read_text())
    assert isinstance(entries, dict), store
    for key, digest in entries.items():
        path, size, mtime_ns, inode = key.rsplit("|", 3)
        assert re.fullmatch("[0-9a-f]{64}", digest), (store, key)
        st = os.stat(path) if os.path.exists(path) else None
        if st and (st.st_size, st.st_mtime_ns, st.st_ino) == (int(size), int(mtime_ns), int(inode)):
            assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest, (store, key)


def eval_cache(folder: Path) -> None:
    """Every entry of an eval cache is one that :class:`EvalCache.get` takes for a hit."""
    from merge_core.evaluation.cache import cache_key

    for entry in sorted(folder.glob("*.json")) if folder.exists() else []:
        record = json.loads(entry.read_text(encoding="utf-8"))
        key = record["key"]
        assert entry.stem == cache_key(key["weights"], key["manifest"], key["decoding"]), entry
        assert isinstance(record["value"]["hypotheses"], list), entry


def temporaries(root: Path) -> list[Path]:
    """The hidden temporaries of :func:`merge_core.atomic.temp_path` under ``root``."""
    return sorted(p for p in root.rglob("*") if TEMPORARY.match(p.name))


# --- running and killing ------------------------------------------------------------------


@dataclass
class Job:
    """A command and what it writes."""

    name: str
    argv: list[str]
    cwd: Path
    outputs: dict[Path, Check]  # documented output -> how to judge it after a kill
    caches: dict[Path, Callable[[Path], None]] = field(default_factory=dict)  # cache -> validity check
    moments: int = 2  # kill moments at ASR_MERGE_CRASH_SEEDS=1
    triggers: dict[str, Callable[[], bool]] = field(default_factory=dict)  # one attempt each, killed when it is true
    resumable: list[Path] = field(default_factory=list)  # what a rerun picks up: cleared with the reference
    redone: list[Path] = field(default_factory=list)  # cleared after an attempt that finished (a rerun would skip)
    log_dir: Path | None = None  # each run's output; beside it, "tmp": the runs' TMPDIR
    runs: int = 0

    def start(self) -> subprocess.Popen:
        assert self.log_dir is not None
        self.runs += 1
        log = open(self.log_dir / f"{self.name}-{self.runs}.log", "wb")  # noqa: SIM115 (the child holds it)
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        # TMPDIR: what a killed run leaves in the system's temporary folder stays in the test's
        tmp = str(self.log_dir.parent / "tmp")
        env = {**os.environ, "ASR_MERGE_CACHE": str(self.cwd / "cache"), "PYTHONPATH": python_path, "TMPDIR": tmp}
        with log:
            return subprocess.Popen(
                self.argv, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log(self) -> str:
        assert self.log_dir is not None
        return (self.log_dir / f"{self.name}-{self.runs}.log").read_text(errors="replace")[-3000:]

    def writing(self) -> bool:
        """An output, or a temporary sibling of one, exists."""
        for out in [*self.outputs, *self.caches]:
            if out.exists():
                return True
            try:
                if any(n.startswith(f".{out.name}.tmp-") for n in os.listdir(out.parent)):
                    return True
            except OSError:
                pass
        return False


@dataclass(frozen=True)
class Timing:
    duration: float  # D: the uninterrupted run, start to exit
    writing: float  # W: when its first output or temporary appeared


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and its children (its session's group), then wait for all of them."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # orphaned children are reaped by init
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(POLL)


def run_reference(job: Job, reference: Path) -> tuple[Timing, dict[Path, Path]]:
    """Run ``job`` uninterrupted, timing it; move its outputs under ``reference``."""
    start = time.monotonic()
    proc = job.start()
    first_write = None
    while proc.poll() is None:
        if first_write is None and job.writing():
            first_write = time.monotonic() - start
        time.sleep(POLL)
    duration = time.monotonic() - start
    assert proc.returncode == 0, job.log()
    assert not temporaries(job.cwd), temporaries(job.cwd)
    refs = {}
    for i, out in enumerate([*job.outputs, *job.caches]):
        refs[out] = reference / f"{i}-{out.name}"
        if out.exists():
            shutil.move(out, refs[out])
    for path in [*job.resumable, job.cwd / "cache"]:
        shutil.rmtree(path, ignore_errors=True)
    return Timing(duration, first_write if first_write is not None else duration), refs


def kill_moments(job: Job, timing: Timing) -> list[float]:
    """``job.moments * ASR_MERGE_CRASH_SEEDS`` moments: stratified over [0, D], then over
    [W, D] (where the writes happen), each uniform in its stratum."""
    rng = random.Random(f"crash:{job.name}")
    n = job.moments * FACTOR
    early, late = n // 2, n - n // 2
    moments = [timing.duration * (i + rng.random()) / early for i in range(early)]
    span = timing.duration - timing.writing
    moments += [timing.writing + span * (i + rng.random()) / late for i in range(late)]
    return moments


def killed_at(job: Job, moment: float) -> subprocess.Popen:
    """Start ``job`` and kill it ``moment`` seconds later, unless it finished first."""
    proc = job.start()
    try:
        proc.wait(timeout=moment)
    except subprocess.TimeoutExpired:
        kill_group(proc)
    return proc


def killed_when(job: Job, trigger: Callable[[], bool]) -> subprocess.Popen:
    """Start ``job`` and kill it as soon as ``trigger()`` is true (polled every millisecond)."""
    proc = job.start()
    while proc.poll() is None:
        if trigger():
            kill_group(proc)
            break
        time.sleep(0.001)
    return proc


def check_outputs(job: Job, refs: dict[Path, Path], finished: bool, context: str) -> None:
    for out, check in job.outputs.items():
        try:
            check(out, refs[out], finished)
        except (AssertionError, OSError, ValueError, KeyError, tarfile.TarError) as e:
            raise AssertionError(f"{context}: {out}: {e!r}\n{job.log()}") from e
    for cache, valid in job.caches.items():
        try:
            valid(cache)
            growing_folder(cache, refs[cache], finished)
        except (AssertionError, OSError, ValueError, KeyError) as e:
            raise AssertionError(f"{context}: cache {cache}: {e!r}") from e
    try:
        hash_cache(job.cwd / "cache" / "sha256.json")
    except (AssertionError, OSError, ValueError) as e:
        raise AssertionError(f"{context}: input hash cache: {e!r}") from e


def crash_and_rerun(job: Job, tmp_path: Path) -> None:
    """The three steps of the module docstring."""
    job.log_dir = tmp_path / "logs"
    job.log_dir.mkdir()
    (tmp_path / "tmp").mkdir()
    reference = tmp_path / "reference"
    reference.mkdir()
    timing, refs = run_reference(job, reference)
    # triggers first: they watch for a write that leftovers of earlier attempts could fake
    attempts: list[tuple[str, Callable[[], subprocess.Popen]]] = [
        (f"killed when {name}", lambda trigger=trigger: killed_when(job, trigger))
        for name, trigger in job.triggers.items()
    ]
    attempts += [
        (f"killed at {moment:.3f} s", lambda moment=moment: killed_at(job, moment))
        for moment in kill_moments(job, timing)
    ]
    finished = False
    for attempt, (how, run) in enumerate(attempts):
        context = f"{job.name}: attempt {attempt} {how} (D {timing.duration:.2f} s, W {timing.writing:.2f} s)"
        proc = run()
        finished = proc.returncode == 0
        assert finished or proc.returncode == -signal.SIGKILL, f"{context}: exited {proc.returncode}\n{job.log()}"
        check_outputs(job, refs, finished=finished, context=context)
        print(f"{context}: {'finished first' if finished else 'killed'}")  # shown with a failure, or with -s
        if finished and attempt < len(attempts) - 1:
            for path in job.redone:
                shutil.rmtree(path, ignore_errors=True)
    if not finished:  # the last attempt was killed: run to completion
        assert job.start().wait() == 0, f"{job.name}: the rerun failed\n{job.log()}"
        check_outputs(job, refs, finished=True, context=f"{job.name}: rerun")
    assert not temporaries(job.cwd), f"{job.name}: left after the rerun: {temporaries(job.cwd)}"


# --- inputs --------------------------------------------------------------------------------


def big_state(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """32 MiB of float32 (a 2048x2048 tensor, four 1024x1024), a float16 bias and an
    integer buffer: enough that the merge's writing takes a measurable part of a run."""
    g = torch.Generator().manual_seed(seed)
    shapes = {**{f"encoder.layers.{i}.weight": (1024, 1024) for i in range(4)}, "encoder.proj.weight": (2048, 2048)}
    state = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        state[name] = noise if base is None else base[name] + 0.1 * noise
    state["decoder.bias"] = torch.randn(512, generator=g).half()
    state["encoder.norm.num_batches_tracked"] = torch.tensor(100 + seed)
    return state


@pytest.fixture(scope="module")
def safetensors_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """base, expert1, expert2 (``.safetensors``)."""
    folder = tmp_path_factory.mktemp("crash_st")
    base = big_state(0)
    paths = [folder / f"{name}.safetensors" for name in ("base", "expert1", "expert2")]
    for path, state in zip(paths, [base, big_state(1, base), big_state(2, base)]):
        save_file(state, path)
    return paths


def toolkit_experts(folder: Path, generalist: Path, prefix: str, stem: str) -> list[Path]:
    """Two experts of a shipped generalist: its ``prefix`` tensors scaled by 1.01 and 0.99."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        scaled_copy(generalist, folder / f"{stem}{i}{generalist.suffix}", prefix, f) for i, f in ((1, 1.01), (2, 0.99))
    ]


def needs(*modules: str, espeak: bool = False) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed")
    if espeak and shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng sox)")


@pytest.fixture(scope="module")
def sb_speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """espeak-ng speech in a LibriSpeech-like tree and SpeechBrain CSVs: ``train``/``dev``
    (eight sentences), ``other`` (four of them in other voices)."""
    needs(espeak=True)
    from tests.speechbrain_merge.conftest import CLEAN_VOICES, OTHER_VOICES, synthesize_split, write_csv

    root = tmp_path_factory.mktemp("crash_sb_speech")
    clean = synthesize_split(root / "data", "test-clean", CLEAN_VOICES, placeholder=True)
    other = synthesize_split(root / "data", "test-other", OTHER_VOICES, placeholder=True)[:4]
    return {
        "data_root": root / "data",
        "train": write_csv(root / "train.csv", clean),
        "dev": write_csv(root / "dev.csv", clean),
        "other": write_csv(root / "other.csv", other),
    }


def sb_decoding() -> dict[str, Any]:
    """What decoding the shipped SpeechBrain generalist needs (as tests/speechbrain_merge/test_select.py)."""
    from tests.speechbrain_merge.conftest import INFERENCE_HPARAMS

    hparams = json.loads((SB_GENERALIST_DIR / "generalist.json").read_text())["hparams"]
    tokenizer = next((SB_GENERALIST_DIR / "tokenizer").glob("*.model"))
    return {
        "hparams": str(INFERENCE_HPARAMS),
        "hparams_overrides": {**hparams, "tokenizer_file": str(tokenizer)},
        "batch_size": 4,
        "device": "cpu",
    }


def temporary_of(dest: Path) -> Callable[[], bool]:
    """A trigger: a temporary sibling of ``dest`` exists (its writing has begun)."""
    prefix = f".{dest.name}.tmp-"
    return lambda: dest.parent.is_dir() and any(n.startswith(prefix) for n in os.listdir(dest.parent))


def write_yaml(path: Path, content: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


# --- the commands ----------------------------------------------------------------------------


MERGES = {
    # name: (output, recipe extras, kill moments)
    "safetensors": ("out/merged.safetensors", {}, 4),
    "sharded": ("out/merged", {"shard_size": "8MiB"}, 3),
    "nemo": ("out/merged.nemo", {}, 2),
    "speechbrain": ("out/CKPT+merged", {}, 2),
}


@pytest.mark.parametrize("kind", list(MERGES))
def test_merge(kind: str, tmp_path: Path, safetensors_models: list[Path]) -> None:
    """``asr-merge merge``: a single file, a sharded folder, a ``.nemo``, a ``CKPT+`` folder."""
    output, extras, moments = MERGES[kind]
    work = tmp_path / "work"
    if kind == "nemo":
        models = [NEMO_GENERALIST, *toolkit_experts(work / "in", NEMO_GENERALIST, "encoder.", "expert")]
    elif kind == "speechbrain":
        models = [SB_GENERALIST, *toolkit_experts(work / "in", SB_GENERALIST, "model.", "CKPT+expert")]
    else:
        work.mkdir()
        models = safetensors_models
    recipe = {
        "method": "average",
        "base_model": str(models[0]),
        "models": [str(m) for m in models[1:]],
        "output": output,
        **extras,
    }
    write_yaml(work / "recipe.yaml", recipe)
    job = Job(f"merge-{kind}", [*CLI, "merge", "recipe.yaml", "-q"], work, {work / output: whole}, moments=moments)
    crash_and_rerun(job, tmp_path)


def test_select_greedy_soup(tmp_path: Path, sb_speech: dict[str, Path]) -> None:
    """``asr-merge select`` of a greedy soup of SpeechBrain checkpoints: the soup and its trial log."""
    needs("speechbrain")
    work = tmp_path / "work"
    candidates = [SB_GENERALIST, *toolkit_experts(work / "in", SB_GENERALIST, "model.", "CKPT+expert")]
    dev = {
        "manifest": str(sb_speech["dev"]),
        "max_utterances": 4,
        "data_root": str(sb_speech["data_root"]),
        "log": "out/soup.trials.json",
        **sb_decoding(),
    }
    write_yaml(
        work / "soup.yaml",
        {"method": "greedy_soup", "models": [str(c) for c in candidates], "dev": dev, "output": "out/CKPT+soup"},
    )
    soup, log = work / "out" / "CKPT+soup", work / "out" / "soup.trials.json"
    job = Job("select", [*CLI, "select", "soup.yaml", "-q"], work, {soup: whole, log: trial_log}, moments=1)
    # in this order: the second attempt starts with the log the first one left
    job.triggers = {"the first trial is logged": log.exists, "the soup is being written": temporary_of(soup)}
    crash_and_rerun(job, tmp_path)


def test_eval_with_cache(tmp_path: Path, sb_speech: dict[str, Path]) -> None:
    """``asr-merge eval`` of two SpeechBrain checkpoints on two sets: report files and eval cache."""
    needs("speechbrain")
    work = tmp_path / "work"
    expert = toolkit_experts(work / "in", SB_GENERALIST, "model.", "CKPT+expert")[0]
    config = {
        "toolkit": "speechbrain",
        "data_root": str(sb_speech["data_root"]),
        "models": [{"name": "generalist", "model": str(SB_GENERALIST)}, {"name": "expert", "model": str(expert)}],
        "manifests": {"test_clean": str(sb_speech["dev"]), "test_other": str(sb_speech["other"])},
        "cache_dir": "evcache",
        "output_dir": "report",
        **sb_decoding(),
    }
    write_yaml(work / "eval.yaml", config)
    report = work / "report"
    # eval.log is left out: it holds what the toolkit printed, less when the cache answered
    outputs = {report / f"report.{kind}": whole for kind in ("json", "md", "png")}
    cache = work / "evcache"
    job = Job("eval", [*CLI, "eval", "eval.yaml", "-q"], work, outputs, caches={cache: eval_cache}, moments=1)
    job.triggers = {
        "the first cache entry is stored": lambda: any(cache.glob("*.json")),
        "report.json is published": (report / "report.json").exists,
    }
    job.redone = [cache, report]  # with every entry cached a rerun decodes nothing
    crash_and_rerun(job, tmp_path)


def test_make_corpus(tmp_path: Path) -> None:
    """``asr-merge make-corpus --size smoke``: resumed after every kill, complete and identical at the end."""
    needs(espeak=True)
    from merge_core.app.corpus.text import FORTUNES_DIR

    if shutil.which("sox") is None or not FORTUNES_DIR.is_dir():
        pytest.skip("sox or Debian's fortunes not installed")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "corpus"
    argv = [*CLI, "make-corpus", "corpus", "--size", "smoke", "--jobs", "2", "-q"]
    job = Job("make-corpus", argv, work, {out: corpus}, moments=1)
    job.triggers = {"utterances.jsonl is published": (out / "utterances.jsonl").exists}
    job.redone = [out]  # a finished corpus is left as it is
    crash_and_rerun(job, tmp_path)


def test_speechbrain_expert_export(tmp_path: Path, sb_speech: dict[str, Path]) -> None:
    """The fine-tuning recipe's ``MergeableBrain`` export (``export_path``): one epoch from the
    shipped generalist, killed and rerun (resuming from its checkpoints, as SpeechBrain does)."""
    needs("speechbrain")
    work = tmp_path / "work"
    work.mkdir()
    argv = [
        sys.executable,
        "-m",
        "speechbrain_merge.recipes.train_ctc",
        str(REPO / "configs" / "speechbrain" / "finetune_generalist.yaml"),
        "--output_folder=run",
        f"--data_root={sb_speech['data_root']}",
        f"--train_csv={sb_speech['train']}",
        f"--valid_csv={sb_speech['dev']}",
        f"--tokenizer_folder={SB_GENERALIST_DIR / 'tokenizer'}",
        f"--init_from={SB_GENERALIST}",
        "--number_of_epochs=1",
        "--batch_size=4",
        "--device=cpu",
        "--noprogressbar",
    ]
    save = work / "run" / "save"
    job = Job("speechbrain-export", argv, work, {work / "run" / "expert" / "CKPT+expert": whole}, moments=1)
    # SpeechBrain's Checkpointer writes CKPT.yaml first: a kill then broke every resume
    job.triggers = {"the epoch's checkpoint has its CKPT.yaml": lambda: any(save.rglob("CKPT.yaml"))}
    job.resumable = [work / "run"]
    crash_and_rerun(job, tmp_path)


def test_nemo_expert_export(tmp_path: Path) -> None:
    """``ExportExpert`` and ``TrajectorySnapshots`` of a seeded two-step NeMo fine-tune."""
    needs("nemo", espeak=True)
    from merge_core.training.snapshots import snapshot_name
    from nemo_merge.testing import UTTERANCES, write_speech_manifest

    manifest = write_speech_manifest(tmp_path / "data" / "train.json", UTTERANCES[:4])
    work = tmp_path / "work"
    work.mkdir()
    job_args = ["nemo-finetune", str(NEMO_GENERALIST), str(manifest), "run"]
    argv = [sys.executable, "-m", "tests.hardening.crash_jobs", *job_args]
    run = work / "run"
    outputs = {run / "expert.nemo": whole}
    outputs.update({run / "snapshots" / snapshot_name(step=step): whole for step in range(1, STEPS + 1)})
    job = Job("nemo-export", argv, work, outputs, moments=0)  # its trigger only: each run costs 20 s
    job.triggers = {"the expert is being exported": temporary_of(run / "expert.nemo")}
    job.resumable = [run]
    crash_and_rerun(job, tmp_path)
