"""A full disk: outputs on a small tmpfs. The error says the disk is full and where,
the previous output at that path is untouched, and nothing half-written remains.

The tmpfs is mounted in the test, which needs root (CI runs as root); elsewhere the
tests are skipped with the reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from merge_core.app.cli import main

PAGE = 4096


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)``: a tmpfs of ``size`` bytes under ``tmp_path``, unmounted after the test."""
    mounts = []

    def mount(size: int) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root")
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        size = (size + PAGE - 1) // PAGE * PAGE
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def recipe(folder: Path, base: Path, experts: list[Path], output: Path, **extra) -> Path:
    path = folder / f"recipe-{output.parent.name}.yaml"
    spec = {"method": "ties", "base_model": str(base), "models": [{"model": str(e)} for e in experts],
            "parameters": {"density": 0.5}, "output": str(output), **extra}
    path.write_text(yaml.safe_dump(spec))
    return path


def assert_full_disk_refused(capsys, recipe_path: Path, output: Path, before: str) -> None:
    assert main(["merge", str(recipe_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asr-merge: error: ") and "Traceback" not in err
    assert "is full" in err and str(output) in err
    assert digest(output) == before, "the previous output was changed"
    assert [n for n in os.listdir(output.parent) if n != output.name] == [], "something half-written remains"


def safetensors_inputs(folder: Path) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(256, 256, generator=g) for i in range(4)}
    save_file(base, folder / "base.safetensors")
    experts = []
    for e in range(2):
        experts.append(folder / f"expert{e}.safetensors")
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, experts[-1])
    return folder / "base.safetensors", experts


@pytest.mark.parametrize("output_name, extra", [("merged.safetensors", {}), ("merged", {"shard_size": 300_000})],
                         ids=["file", "sharded-folder"])
def test_merge_onto_a_full_disk_says_so_and_keeps_the_previous_output(tmp_path, small_disk, capsys, output_name, extra):
    base, experts = safetensors_inputs(tmp_path)
    previous = tmp_path / "previous" / output_name
    assert main(["merge", str(recipe(tmp_path, base, experts, previous, **extra)), "-q"]) == 0
    disk = small_disk(size_of(previous) * 3 // 2)
    output = disk / output_name
    shutil.copytree(previous, output) if previous.is_dir() else shutil.copyfile(previous, output)
    assert_full_disk_refused(capsys, recipe(tmp_path, base, experts, output, **extra), output, digest(previous))


@pytest.mark.slow
def test_nemo_merge_onto_a_full_disk_says_so_and_keeps_the_previous_output(tmp_path, small_disk, capsys, tiny_nemo_base):
    previous = tmp_path / "previous" / "merged.nemo"
    assert main(["merge", str(recipe(tmp_path, tiny_nemo_base, [tiny_nemo_base] * 2, previous)), "-q"]) == 0
    disk = small_disk(size_of(previous) * 3 // 2)
    output = disk / "merged.nemo"
    shutil.copyfile(previous, output)
    assert_full_disk_refused(capsys, recipe(tmp_path, tiny_nemo_base, [tiny_nemo_base] * 2, output), output, digest(previous))


@pytest.mark.slow
def test_evaluation_report_onto_a_full_disk_says_so(tmp_path, small_disk, capsys, tiny_nemo_base, nemo_audio_manifest):
    """The transcripts are cached on a disk with room; the report's folder has none."""
    disk = small_disk(PAGE * 2)
    config = {
        "toolkit": "nemo",
        "models": [{"name": "generalist", "model": str(tiny_nemo_base)}],
        "manifests": {"test_clean": str(nemo_audio_manifest)},
        "forgetting_sets": ["test_clean"],
        "output_dir": str(disk / "report"),
        "cache_dir": str(tmp_path / "cache"),
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["eval", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "is full" in err and str(disk / "report") in err and "Traceback" not in err
    leftovers = [p for p in disk.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
