"""Two runs writing to one place at the same moment: each completes with a whole output
or refuses clearly; the result is one run's output, never a mix of both.

How (see :mod:`merge_core.atomic`): every output is written under a private temporary
name and renamed into place (files: ``rename``; folders: one ``renameat2`` exchange
under an ``flock`` of the parent folder); eval cache entries are content-addressed
(the name is the hash of what was decoded), so two runs filling one entry write the
same bytes and either rename wins.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from merge_core.atomic import publish, temp_path
from merge_core.evaluation.cache import EvalCache
from tests.checkpoint_helpers import read_weights

ASR_MERGE = str(Path(sys.executable).parent / "asr-merge")
ROUNDS = int(os.environ.get("ASR_MERGE_RACE_ROUNDS", "1"))


def temporaries(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


# ----------------------------------------------------------------------------- folders


def _publish_many(dest: str, writer: int, count: int, start: "multiprocessing.Barrier | None") -> None:
    if start is not None:
        start.wait()
    for i in range(count):
        tmp = temp_path(Path(dest))
        tmp.mkdir()
        for part in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "index.json"):
            (tmp / part).write_text(f"{writer}:{i}\n" * 2000)
        publish(tmp, Path(dest))


def _read_folder(dest: str) -> dict[str, str]:
    """The files of the folder at ``dest`` when it was opened: read through its descriptor,
    as a reader that opened it before a swap keeps reading the folder it opened."""
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        contents = {}
        for name in os.listdir(fd):
            with open(os.open(name, os.O_RDONLY, dir_fd=fd)) as f:
                contents[name] = f.read()
        return contents
    finally:
        os.close(fd)


def _read_until(dest: str, start: "multiprocessing.Barrier", stop: "multiprocessing.Event", seen: "multiprocessing.Queue") -> None:
    """Read the folder continuously; report every state that is not one whole publish."""
    bad, reads = [], 0
    start.wait()
    while not stop.is_set():
        try:
            contents = _read_folder(dest)
        except FileNotFoundError as e:
            if not os.path.exists(dest):
                bad.append(f"missing: {e}")
            continue  # else the folder opened was the old one, removed while being read
        if not contents:
            continue  # the old folder opened just as its files were removed
        reads += 1
        if len(contents) != 3 or len(set(contents.values())) != 1:
            bad.append(f"mix: { {k: v[:8] for k, v in contents.items()} }")
    seen.put((reads, bad))


def test_folder_publishes_racing_never_show_a_mix_or_a_gap(tmp_path):
    """Two processes swap 30 folders each onto one path while a third reads it: every
    read sees the three files of one publish, and the folder is never missing."""
    dest = tmp_path / "merged"
    ctx = multiprocessing.get_context("spawn")
    _publish_many(str(dest), -1, 1, None)  # an earlier output is in place, as after a first run
    queue, start, stop = ctx.Queue(), ctx.Barrier(3), ctx.Event()
    reader = ctx.Process(target=_read_until, args=(str(dest), start, stop, queue))
    writers = [ctx.Process(target=_publish_many, args=(str(dest), w, 30, start)) for w in range(2)]
    for p in [reader, *writers]:
        p.start()
    for p in writers:
        p.join(120)
        assert p.exitcode == 0
    stop.set()
    reads, bad = queue.get(timeout=60)
    reader.join(10)
    assert reads > 10, "the reader must have overlapped the writers"
    assert bad == []
    final = {p.read_text() for p in dest.iterdir()}
    assert len(final) == 1 and next(iter(final)).startswith(("0:29", "1:29"))
    assert temporaries(tmp_path) == []


# ----------------------------------------------------------------------------- eval cache


def _fill_cache(folder: str, worker: int, keys: int, start: "multiprocessing.Barrier") -> None:
    start.wait()
    cache = EvalCache(folder)
    for k in range(keys):
        parts = (f"{k:064x}", "m" * 64, {"strategy": "greedy"})
        cached = cache.get(parts)
        value = {"hypotheses": [f"utterance {k} word {j}" for j in range(200)]}
        assert cached is None or cached == value, f"entry {k} read back as {str(cached)[:80]}"
        cache.put(parts, value)


def test_eval_cache_filled_by_racing_processes_stays_consistent(tmp_path):
    """Three processes fill the same 200 entries at once, each reading an entry before
    writing it: every read is a miss or the whole value; every entry is valid after."""
    folder = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(3)
    workers = [ctx.Process(target=_fill_cache, args=(str(folder), w, 200, start)) for w in range(3)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0, "a worker read a partial or foreign cache entry"
    cache = EvalCache(folder)
    for k in range(200):
        assert cache.get((f"{k:064x}", "m" * 64, {"strategy": "greedy"}))["hypotheses"][199] == f"utterance {k} word 199"
    assert len(list(folder.glob("*.json"))) == 200
    assert temporaries(folder) == []


# ----------------------------------------------------------------------------- merges


def _experts(folder: Path) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    base = {f"encoder.layers.{i}.weight": torch.randn(512, 512, generator=g) for i in range(6)}
    paths = [folder / "base.safetensors"]
    save_file(base, paths[0])
    for e in range(2):
        paths.append(folder / f"expert{e}.safetensors")
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, paths[-1])
    return paths


def _recipe(folder: Path, name: str, method: str, output: Path, experts: list[Path], shard: bool) -> Path:
    recipe = {
        "method": method,
        "base_model": str(experts[0]),
        "models": [{"model": str(p)} for p in experts[1:]],
        "parameters": {"lambda": 1.0} if method == "task_arithmetic" else {},
        "output": str(output),
        "hash_inputs": False,
    }
    if shard:
        recipe["shard_size"] = 2 << 20
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("output_name", ["merged.safetensors", "merged"], ids=["file", "sharded-folder"])
def test_two_merges_to_one_output_leave_one_whole_result(tmp_path, output_name):
    """An average and a task arithmetic of the same experts, started together with the
    same output: both finish, and the output is exactly one of the two merges."""
    experts = _experts(tmp_path)
    shard = output_name == "merged"
    expected = {}
    for method in ("average", "task_arithmetic"):
        alone = tmp_path / f"alone-{method}" / output_name
        subprocess.run([ASR_MERGE, "merge", str(_recipe(tmp_path, f"alone-{method}", method, alone, experts, shard)), "-q"], check=True)
        expected[method] = read_weights(alone)
    output = tmp_path / "shared" / output_name
    recipes = [_recipe(tmp_path, method, method, output, experts, shard) for method in expected]
    for _ in range(ROUNDS):
        runs = [subprocess.Popen([ASR_MERGE, "merge", str(r), "-q"], stderr=subprocess.PIPE, text=True) for r in recipes]
        for run in runs:
            _, err = run.communicate(timeout=300)
            assert run.returncode == 0, err
        got = read_weights(output)
        assert any(all(torch.equal(got[k], want[k]) for k in want) for want in expected.values()), "a mix of both merges"
        assert temporaries(output.parent) == []


# ----------------------------------------------------------------------------- evaluations


def _eval_config(folder: Path, name: str, model: Path, manifest: Path, cache: Path) -> Path:
    config = {
        "toolkit": "nemo",
        "models": [{"name": "generalist", "model": str(model)}],
        "manifests": {"test_clean": str(manifest)},
        "forgetting_sets": ["test_clean"],
        "batch_size": 4,
        "output_dir": str(folder / "report"),
        "cache_dir": str(cache),
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_two_evaluations_filling_one_cache_agree_with_a_lone_one(tmp_path, tiny_nemo_base, nemo_audio_manifest):
    """Two `asr-merge eval` runs with the same config, output folder and (empty) cache
    at once: both succeed, the report and the cache entry equal a lone run's."""
    pytest.importorskip("nemo.collections.asr")

    (tmp_path / "lone").mkdir()
    lone = _eval_config(tmp_path / "lone", "eval", tiny_nemo_base, nemo_audio_manifest, tmp_path / "lone" / "cache")
    subprocess.run([ASR_MERGE, "eval", str(lone), "-q"], check=True, capture_output=True)
    shared = tmp_path / "shared"
    shared.mkdir()
    config = _eval_config(shared, "eval", tiny_nemo_base, nemo_audio_manifest, shared / "cache")
    runs = [subprocess.Popen([ASR_MERGE, "eval", str(config), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err

    def scores(folder: Path) -> list:
        return json.loads((folder / "report" / "report.json").read_text())["models"]

    assert scores(shared) == scores(tmp_path / "lone")
    entries = sorted((shared / "cache").glob("*.json"))
    assert [e.name for e in entries] == [e.name for e in sorted((tmp_path / "lone" / "cache").glob("*.json"))]
    assert all(json.loads(e.read_text())["value"]["hypotheses"] for e in entries)
    assert temporaries(shared / "cache") == [] and temporaries(shared / "report") == []
