"""Resource limits: inputs whose size would exhaust the machine are refused up front.

- A merge of checkpoints whose headers claim tensors larger than the memory available
  is refused before any tensor is read (the files here are sparse: they claim the size
  without holding it).
- An evaluation of a manifest with a two-hour audio file is refused before any model is
  loaded: utterances are decoded whole, so their length is bounded by ``max_duration``
  (seconds, 300 by default, read from the audio header, not from the manifest).
"""

from __future__ import annotations

import json
import resource
import struct
import time
from pathlib import Path

import pytest
import yaml

from merge_core.app.cli import main
from merge_core.engine import available_memory
from merge_core.evaluation.runner import EvalConfig
from merge_core.plugins import toolkit as toolkit_plugin

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(available_memory() is None, reason="needs /proc/meminfo")


def sparse_safetensors(path: Path, elements: int) -> Path:
    """A valid safetensors file holding one float32 vector of ``elements`` entries, all
    zeros and sparse on disk (the header tells the truth; the disk holds almost nothing)."""
    header = json.dumps({"layers.0.weight": {"dtype": "F32", "shape": [elements], "data_offsets": [0, elements * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + elements * 4)
    return path


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_merge_of_tensors_larger_than_memory_is_refused_before_reading(tmp_path, capsys):
    elements = available_memory() // 4 + 1  # one float32 copy alone fills the memory
    paths = [sparse_safetensors(tmp_path / f"{n}.safetensors", elements) for n in ("base", "a", "b")]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base_model": str(paths[0]), "output": str(tmp_path / "out.safetensors"),
                                      "models": [{"model": str(p)} for p in paths[1:]], "hash_inputs": False}))
    rss, start = peak_rss(), time.perf_counter()
    assert main(["merge", str(recipe), "-q"]) == 2
    assert time.perf_counter() - start < 30
    assert peak_rss() - rss < 256 << 20, "memory was allocated for the claimed tensors"
    err = capsys.readouterr().err
    assert "layers.0.weight" in err and str(paths[0]) in err and "GiB of memory available" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "base.safetensors", "recipe.yaml"]


def long_wav(path: Path, seconds: int, rate: int = 16000) -> Path:
    """A 16-bit mono WAV of ``seconds`` of silence, sparse on disk."""
    data = seconds * rate * 2
    header = b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    with open(path, "wb") as f:
        f.write(header + b"data" + struct.pack("<I", data))
        f.truncate(44 + data)
    return path


@pytest.mark.parametrize("toolkit", ["nemo", "speechbrain"])
def test_evaluation_of_a_two_hour_file_is_refused_before_decoding(tmp_path, capsys, toolkit):
    audio = long_wav(tmp_path / "lecture.wav", 2 * 3600)
    if toolkit == "nemo":
        manifest = tmp_path / "long.json"
        manifest.write_text(json.dumps({"audio_filepath": str(audio), "duration": 3.0, "text": "a lie about its length"}) + "\n")
    else:
        manifest = tmp_path / "long.csv"
        manifest.write_text(f"ID,duration,wav,spk_id,wrd\nu1,3.0,{audio},s1,A LIE ABOUT ITS LENGTH\n")
    config = tmp_path / "eval.yaml"
    extra = {"hparams": str(ROOT / "configs" / "speechbrain" / "generalist_inference.yaml")} if toolkit == "speechbrain" else {}
    config.write_text(yaml.safe_dump({"toolkit": toolkit, "models": [{"model": str(tmp_path / "never-loaded")}],
                                      "manifests": {"test_clean": str(manifest)}, "forgetting_sets": ["test_clean"],
                                      "output_dir": str(tmp_path / "report"), "cache": False, **extra}))
    plugin = toolkit_plugin(toolkit)
    plugin.load(plugin.evaluate, "the test")  # imported first, so the toolkit's own size is not counted
    rss = peak_rss()
    assert main(["eval", str(config), "-q"]) == 2
    assert peak_rss() - rss < 256 << 20
    err = capsys.readouterr().err
    assert "lecture.wav" in err and "lasts 7200 s" in err and "max_duration=300 s" in err and "Traceback" not in err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("value", [0, -5, "long", True, float("inf")])
def test_max_duration_must_be_a_positive_number_or_null(value):
    raw = {"models": ["m.nemo"], "manifests": {"test_clean": "a.json", "test_other": "b.json"}, "max_duration": value}
    with pytest.raises(Exception, match="max_duration"):
        EvalConfig.from_mapping(raw)
    assert EvalConfig.from_mapping({**raw, "max_duration": None}).max_duration is None
    assert EvalConfig.from_mapping({k: v for k, v in raw.items() if k != "max_duration"}).max_duration == 300
