"""Fuzzing every checkpoint reader: safetensors (single and sharded), torch pickles,
``.nemo`` archives, SpeechBrain ``CKPT+`` folders and CTranslate2 Whisper folders.

Each example starts from a valid tiny input built here and applies a generated,
structured corruption (a truncation, overwritten bytes, a rewritten header or member,
a YAML alias bomb...). The reader must either accept it with a sane result, or refuse
it with the project's own error naming the file, within bounded time and memory,
without changing the input or writing anything (no output, no hidden temporary,
no leftover in the system's temporary folder).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from safetensors.torch import save_file

from merge_core.checkpoint import open_checkpoint
from merge_core.errors import MergeError
from tests.hardening.conftest import FUZZ_EXAMPLES

SECONDS = 10.0  # per call: generous on a shared 2-core machine; a hang or bomb takes far longer
RSS_GROWTH_MB = 300
ASR_MERGE = str(Path(sys.executable).parent / "asr-merge")


# ----------------------------------------------------------------------------- the property


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def tree(*folders: Path) -> dict[str, str]:
    """Every path under ``folders`` with its content hash (links and folders marked)."""
    out: dict[str, str] = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "folder"
    return out


@pytest.fixture(scope="module", autouse=True)
def private_system_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The readers' own temporaries (a .nemo's extracted weights) go here, so a leftover is seen."""
    folder = tmp_path_factory.mktemp("system-tmp")
    before, tempfile.tempdir = tempfile.tempdir, str(folder)
    yield folder
    tempfile.tempdir = before


def system_tmp() -> Path:
    return Path(tempfile.gettempdir())


@contextlib.contextmanager
def example_dir() -> Iterator[Path]:
    """A fresh folder for one generated example, outside the watched system temporary folder."""
    with tempfile.TemporaryDirectory(dir=Path(tempfile.gettempdir()).parent) as d:
        yield Path(d)


def outcome(call: Callable[[], Any], names: list[str], watched: list[Path]) -> tuple[Any, MergeError | None]:
    """Run ``call``: it returns, or raises a MergeError whose message names one of ``names``
    and says more than that; bounded time and memory; nothing under ``watched`` changes
    and nothing is left in the system's temporary folder. Any other exception fails the test."""
    before, rss, start = tree(*watched), peak_rss_mb(), time.perf_counter()
    try:
        result, error = call(), None
    except MergeError as e:
        result, error = None, e
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    assert peak_rss_mb() - rss < RSS_GROWTH_MB, f"peak RSS grew by {peak_rss_mb() - rss:.0f} MB"
    assert tree(*watched) == before, "the call changed or wrote files"
    assert [p for p in system_tmp().iterdir() if not p.name.startswith("torchinductor_")] == [], (
        "a temporary was left behind"
    )
    if currently_in_test_context():  # counted in --hypothesis-show-statistics
        event("accepted" if error is None else f"refused: {type(error).__name__}")
    if error is not None:
        message = str(error)
        named = [n for n in names if n in message]
        assert named, f"the message does not name {names}: {message}"
        assert len(message) > len(named[0]) + 8, f"the message does not say what is wrong: {message}"
        assert "Traceback" not in message
    return result, error


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Open, and read every tensor, checking each against its announced spec."""
    with open_checkpoint(path) as reader:
        out = {}
        for name in reader.keys():
            assert isinstance(name, str)
            spec, tensor = reader.spec(name), reader.get(name)
            assert isinstance(tensor, torch.Tensor)
            assert (tuple(tensor.shape), tensor.dtype) == (spec.shape, spec.dtype), name
            out[name] = tensor.clone()
        assert out, "a reader accepted a checkpoint without tensors"
        return out


# ----------------------------------------------------------------------------- generated values

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)


@st.composite
def byte_damage(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` truncated, or with a few bytes overwritten, or with bytes appended."""
    how = draw(st.sampled_from(["truncate", "overwrite", "append"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=64))
    at = draw(st.integers(0, len(data) - 1))
    patch = draw(st.binary(min_size=1, max_size=16))
    return data[:at] + patch + data[at + len(patch) :]


# ----------------------------------------------------------------------------- safetensors


def tiny_state() -> dict[str, torch.Tensor]:
    return {
        "enc.w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "enc.b": torch.ones(3, dtype=torch.float16),
        "steps": torch.tensor(7, dtype=torch.int64),
    }


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory(dir=Path(tempfile.gettempdir()).parent) as d:
        save_file(state, Path(d) / "x.safetensors")
        buf.write((Path(d) / "x.safetensors").read_bytes())
    return buf.getvalue()


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: Any, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


DTYPE_NAMES = [
    "F64",
    "F32",
    "F16",
    "BF16",
    "I64",
    "I8",
    "U8",
    "BOOL",
    "F8_E4M3",
    "C64",
    "F4",
    "F8_E8M0",
    "E8M0",
    "Q4",
    "f32",
    "",
]
huge = st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1])


@st.composite
def header_rewrite(draw: st.DrawFn, data: bytes) -> bytes:
    """The header JSON rewritten: one field of one tensor, the metadata, or the whole header."""
    header, body = split_safetensors(data)
    names = [k for k in header if k != "__metadata__"]
    what = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "metadata", "entry", "whole", "extra"]))
    name = draw(st.sampled_from(names))
    if what == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(DTYPE_NAMES) | json_values)
    elif what == "shape":
        header[name]["shape"] = draw(st.lists(st.integers(0, 8) | huge, max_size=4) | json_values)
    elif what == "data_offsets":
        start, end = header[name]["data_offsets"]
        near = st.integers(-2, len(body) + 2) | huge | st.sampled_from([start, end])
        header[name]["data_offsets"] = draw(st.lists(near, min_size=0, max_size=3) | json_values)
    elif what == "drop":
        del header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif what == "metadata":
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3) | json_values)
    elif what == "entry":
        header[name] = draw(json_values)
    elif what == "extra":
        header[draw(st.text(max_size=6))] = {
            "dtype": "F32",
            "shape": [2],
            "data_offsets": draw(st.lists(near_any, min_size=2, max_size=2)),
        }
    else:
        header = draw(json_values)
    return join_safetensors(header, body)


near_any = st.integers(0, 64) | huge


@st.composite
def header_length_lie(draw: st.DrawFn, data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    lie = draw(st.sampled_from([0, 1, n - 1, n + 1, n + 8, len(data) - 8, len(data), 100 << 20, 2**63]) | huge)
    return struct.pack("<Q", lie % 2**64) + data[8:]


@st.composite
def header_not_json(draw: st.DrawFn, data: bytes) -> bytes:
    _, body = split_safetensors(data)
    text = draw(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
    return struct.pack("<Q", len(text)) + text + body


VALID_SAFETENSORS = safetensors_bytes(tiny_state())
damaged_safetensors = st.one_of(
    byte_damage(VALID_SAFETENSORS),
    header_rewrite(VALID_SAFETENSORS),
    header_length_lie(VALID_SAFETENSORS),
    header_not_json(VALID_SAFETENSORS),
)


@given(damaged_safetensors)
def test_safetensors_file(data: bytes) -> None:
    with example_dir() as d:
        path = d / "model.safetensors"
        path.write_bytes(data)
        outcome(lambda: read_all(path), [str(path)], [d])


SHARD_NAMES = [
    "../outside.safetensors",
    "/etc/passwd",
    "sub/../../outside.safetensors",
    "missing.safetensors",
    "",
    ".",
    "b.safetensors",
    "a.safetensors",
    "model.safetensors.index.json",
    "a\x00b",
]


@st.composite
def sharded_folder(draw: st.DrawFn) -> tuple[Any, dict[str, bytes]]:
    """An index (possibly damaged) and shard files (one possibly damaged)."""
    state = tiny_state()
    shards = {
        "a.safetensors": safetensors_bytes({k: state[k] for k in ["enc.w", "enc.b"]}),
        "b.safetensors": safetensors_bytes({"steps": state["steps"]}),
    }
    index: Any = {
        "metadata": {"total_size": 40},
        "weight_map": {"enc.w": "a.safetensors", "enc.b": "a.safetensors", "steps": "b.safetensors"},
    }
    what = draw(st.sampled_from(["map_value", "map_entry", "weight_map", "index", "shard"]))
    if what == "map_value":
        key = draw(st.sampled_from(["enc.w", "enc.b", "steps", "ghost"]))
        index["weight_map"][key] = draw(st.sampled_from(SHARD_NAMES) | json_values)
    elif what == "map_entry":
        index["weight_map"] = draw(st.dictionaries(st.text(max_size=5), st.sampled_from(SHARD_NAMES), max_size=3))
    elif what == "weight_map":
        index["weight_map"] = draw(json_values)
    elif what == "index":
        index = draw(json_values)
    else:
        name = draw(st.sampled_from(sorted(shards)))
        shards[name] = draw(damaged_safetensors if name == "a.safetensors" else byte_damage(shards[name]))
    return index, shards


@given(sharded_folder())
def test_sharded_safetensors_folder(folder: tuple[Any, dict[str, bytes]]) -> None:
    index, shards = folder
    with example_dir() as d:
        (d / "outside.safetensors").write_bytes(VALID_SAFETENSORS)  # what an escaping shard name would reach
        model = d / "model"
        model.mkdir()
        for name, data in shards.items():
            (model / name).write_bytes(data)
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
        result, _ = outcome(lambda: read_all(model), [str(model)], [d])
        if result is not None:
            assert set(result) <= {"enc.w", "enc.b", "steps"}


# ----------------------------------------------------------------------------- torch pickles

MARKER_NAME = "unpickled-marker"


class Payload:
    """Creates a marker file when unpickled: proof that arbitrary code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.marker.touch, ())


class SystemCall:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("true",))


tensors = st.builds(
    lambda n, dtype: torch.arange(n).to(dtype),
    st.integers(0, 4),
    st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
)
pickle_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | tensors
    | st.just("<payload>")
    | st.just("<system>")
)
pickle_trees = st.recursive(
    pickle_leaves,
    lambda c: (
        st.lists(c, max_size=3)
        | st.lists(c, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4), c, max_size=3)
        | st.dictionaries(st.integers(0, 3), c, max_size=2)
        | st.dictionaries(st.text(max_size=4), c, max_size=3).map(OrderedDict)
    ),
    max_leaves=8,
)
state_dicts = st.dictionaries(st.text(max_size=6), tensors, min_size=1, max_size=3)


def _materialise(obj: Any, marker: Path) -> Any:
    """Replace the placeholders by objects whose unpickling would run code."""
    if isinstance(obj, str) and obj in ("<payload>", "<system>"):
        return Payload(marker) if obj == "<payload>" else SystemCall()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _materialise(v, marker)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialise(v, marker) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, marker) for v in obj)
    return obj


def _has_code(obj: Any) -> bool:
    if isinstance(obj, str):
        return obj in ("<payload>", "<system>")
    if isinstance(obj, dict):
        return any(_has_code(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_code(v) for v in obj)
    return False


def _tensor_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def torch_bytes(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


@given(
    st.one_of(
        pickle_trees,
        state_dicts,
        st.builds(
            lambda s, extra: {"state_dict": s, **extra},
            state_dicts | pickle_trees,
            st.dictionaries(st.sampled_from(["epoch", "loops"]), pickle_trees, max_size=2),
        ),
    ),
    st.booleans(),
)
def test_torch_pickle_of_any_object(obj: Any, legacy: bool) -> None:
    with example_dir() as d:
        marker = d / MARKER_NAME
        path = d / "model.pt"
        path.write_bytes(torch_bytes(_materialise(obj, marker), legacy))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy format's warning
            result, error = outcome(lambda: read_all(path), [str(path)], [d])
        assert not marker.exists(), "unpickling ran code"
        lightning = isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)
        state = obj["state_dict"] if lightning else obj
        loadable = not _has_code(obj) and _tensor_mapping(state)
        assert (result is not None) == loadable, (result, error)
        if result is not None:
            assert list(result) == list(state)
        if error is not None and _has_code(obj):
            assert "weights-only" in str(error) or "not a tensor" in str(error) or "no state dict" in str(error)


VALID_TORCH = torch_bytes(tiny_state())
VALID_LEGACY_TORCH = torch_bytes(tiny_state(), legacy=True)


@given(st.one_of(byte_damage(VALID_TORCH), byte_damage(VALID_LEGACY_TORCH), st.binary(max_size=256)))
def test_torch_file_with_damaged_bytes(data: bytes) -> None:
    with example_dir() as d:
        path = d / "model.ckpt"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy format's warning
            result, _ = outcome(lambda: read_all(path), [str(path)], [d])
        if result is not None:  # overwritten bytes may rename a tensor or change its values
            assert len(result) <= len(tiny_state())


# ----------------------------------------------------------------------------- .nemo archives

NEMO_CONFIG = yaml.safe_dump(
    {"target": "nemo.EncDecCTCModel", "encoder": {"d_model": 8, "n_layers": 1, "dropout": 0.1}, "optim": {"lr": 0.1}}
).encode()


def laughs(levels: int, width: int, mapping: bool) -> str:
    """A "billion laughs" alias bomb under ``encoder``: width**levels leaves once expanded."""
    lines = [
        "encoder:",
        "  l0: &l0 "
        + (
            "{" + ", ".join(f"k{i}: lol" for i in range(width)) + "}"
            if mapping
            else "[" + ", ".join(["lol"] * width) + "]"
        ),
    ]
    for n in range(1, levels):
        refs = ", ".join(f"k{i}: *l{n - 1}" for i in range(width)) if mapping else ", ".join([f"*l{n - 1}"] * width)
        lines.append(f"  l{n}: &l{n} " + ("{" + refs + "}" if mapping else "[" + refs + "]"))
    return "\n".join(lines) + "\n"


def nested(depth: int, mapping: bool) -> str:
    return "encoder: " + ("{a: " * depth + "1" + "}" * depth if mapping else "[" * depth + "]" * depth) + "\n"


config_texts = st.one_of(
    st.builds(lambda v: yaml.safe_dump(v).encode(), json_values),  # mostly not a mapping
    st.builds(lambda v: yaml.safe_dump({"encoder": v, "target": "x"}).encode(), json_values),
    st.builds(lambda lv, w, m: laughs(lv, w, m).encode(), st.integers(3, 9), st.integers(2, 9), st.booleans()),
    st.sampled_from(
        [
            b"encoder: &x {self: *x}\n",
            b"encoder: &x [*x]\n",
            b"encoder: &x [1, [2, *x]]\n",
            b"&x {encoder: *x}\n",
            b"\xff\xfe\x00e\x00n",
            b"encoder: {\n",
            b"encoder: *nope\n",
            b"!!python/object:os.system {}\n",
        ]
    ),
    st.builds(lambda d, m: nested(d, m).encode(), st.integers(1, 3000), st.booleans()),
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=40),
)

UNSAFE_NAMES = [
    "/etc/evil",
    "../evil",
    "./../evil",
    "a/../../evil",
    "./model_weights.ckpt",
    "model_weights.ckpt",
    "./model_config.yaml",
    "sub/model_weights.ckpt",
    ".",
    "./",
    "a\\..\\evil",
    "tokenizer/vocab.txt",
]
LINK_TARGETS = [
    "../outside",
    "/etc/passwd",
    "model_weights.ckpt",
    "./model_weights.ckpt",
    "a/../../outside",
    "sub/../x",
    "",
]
MEMBER_TYPES = [
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.FIFOTYPE,
    tarfile.DIRTYPE,
    tarfile.CONTTYPE,
]


def tar_bytes(members: list[tuple[str, bytes, str, bytes]], gz: bool) -> bytes:
    """A tar (gzip-compressed when ``gz``) of (name, type, linkname, data) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, link, data in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = kind, link, 0o644
            info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) else 0
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return buf.getvalue()


VALID_WEIGHTS = torch_bytes(
    {"encoder.w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "encoder.b": torch.ones(3)}
)


@st.composite
def nemo_archives(draw: st.DrawFn) -> bytes:
    prefix = draw(st.sampled_from(["./", ""]))
    members = [
        (prefix + "model_config.yaml", tarfile.REGTYPE, "", NEMO_CONFIG),
        (prefix + "model_weights.ckpt", tarfile.REGTYPE, "", VALID_WEIGHTS),
    ]
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["member", "duplicate", "config", "weights"]))
        if what == "member":
            kind = draw(st.sampled_from(MEMBER_TYPES))
            name = draw(st.sampled_from(UNSAFE_NAMES) | st.text(min_size=1, max_size=12))
            link = (
                draw(st.sampled_from(LINK_TARGETS) | st.text(max_size=12))
                if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE)
                else ""
            )
            members.append((name, kind, link, draw(st.binary(max_size=32))))
        elif what == "duplicate":
            name, kind, link, _ = draw(st.sampled_from(members))
            bare = name.removeprefix("./")
            members.append(
                (
                    draw(st.sampled_from([name, bare, "./" + bare])),
                    kind,
                    link,
                    draw(st.sampled_from([VALID_WEIGHTS, NEMO_CONFIG])),
                )
            )
        elif what == "config":
            members[0] = (members[0][0], tarfile.REGTYPE, "", draw(config_texts))
        elif what == "weights":
            data = draw(byte_damage(VALID_WEIGHTS) | st.binary(max_size=64) | st.builds(torch_bytes, pickle_trees))
            members[1] = (members[1][0], tarfile.REGTYPE, "", data)
    dropped = draw(st.sampled_from([None, "model_config.yaml", "model_weights.ckpt"]))
    members = [m for m in members if m[0] != prefix + dropped] if dropped else members
    archive = tar_bytes(members, gz=draw(st.booleans()))
    return draw(byte_damage(archive)) if draw(st.booleans()) else archive


def read_nemo(path: Path, base: Path) -> dict[str, torch.Tensor]:
    """Read every tensor, and compare model configs with a valid archive both ways."""
    tensors = read_all(path)
    with open_checkpoint(path) as fuzzed, open_checkpoint(base) as valid:
        fuzzed.check_compatible_with(valid)
        valid.check_compatible_with(fuzzed)
    return tensors


@pytest.fixture(scope="module")
def valid_nemo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("nemo_merge.nemo_io")
    path = tmp_path_factory.mktemp("nemo") / "base.nemo"
    path.write_bytes(
        tar_bytes(
            [
                ("./model_config.yaml", tarfile.REGTYPE, "", NEMO_CONFIG),
                ("./model_weights.ckpt", tarfile.REGTYPE, "", VALID_WEIGHTS),
            ],
            gz=False,
        )
    )
    return path


@given(nemo_archives())
def test_nemo_archive(valid_nemo: Path, data: bytes) -> None:
    with example_dir() as d:
        path = d / "model.nemo"
        path.write_bytes(data)
        result, _ = outcome(lambda: read_nemo(path, valid_nemo), [str(path)], [d, valid_nemo.parent])
        if result is not None:
            assert set(result) <= {"encoder.w", "encoder.b"}
        assert not (d.parent / "evil").exists() and not (d.parent / "outside").exists()


def member_bytes(name: str, data: bytes) -> bytes:
    """One regular tar member (header, data, padding): archives are built from these by hand."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512)


def gzip_zeros(total: int) -> bytes:
    """``total`` zero bytes gzip-compressed as repeated members (cheap to build: 1 MiB stays ~1 KiB)."""
    block = gzip.compress(bytes(1 << 20), compresslevel=9, mtime=0)
    assert total % (1 << 20) == 0
    return block * (total >> 20)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writing a file past ``limit`` bytes fails (EFBIG) instead of filling the disk."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def bomb_nemo(path: Path, size: int, prefix: bytes = b"") -> Path:
    """A gzip .nemo whose weights member is ``prefix`` + zeros, ``size`` bytes in all, and
    that only its gzip stream knows: the archive file stays small."""
    config = member_bytes("./model_config.yaml", NEMO_CONFIG)
    info = tarfile.TarInfo("./model_weights.ckpt")
    info.size = size
    head = gzip.compress(config + info.tobuf(format=tarfile.GNU_FORMAT) + prefix, mtime=0)
    body = size - len(prefix)
    tail = gzip.compress(bytes(body % (1 << 20)) + bytes(-size % 512) + bytes(1024), mtime=0)
    path.write_bytes(head + gzip_zeros(body - body % (1 << 20)) + tail)
    return path


@settings(max_examples=min(FUZZ_EXAMPLES, 6))
@given(st.sampled_from([256 << 20, 1 << 30]), st.sampled_from([b"", b"PK\x03\x04"]))
def test_nemo_decompression_bomb_is_refused_before_extraction(size: int, prefix: bytes) -> None:
    pytest.importorskip("nemo_merge.nemo_io")
    with example_dir() as d:
        path = bomb_nemo(d / "bomb.nemo", size, prefix)
        assert path.stat().st_size < size // 500
        with file_size_limit(32 << 20):  # extracting the member would fail with EFBIG, not a MergeError
            _, error = outcome(lambda: read_all(path), [str(path)], [d])
        assert error is not None and "decompression bomb" in str(error)


@settings(max_examples=min(FUZZ_EXAMPLES, 10))
@given(st.integers(1 << 20, 1 << 44), st.booleans())
def test_nemo_member_claiming_more_than_the_file_holds(size: int, gz: bool) -> None:
    """A tar header whose size is far larger than the data behind it."""
    pytest.importorskip("nemo_merge.nemo_io")
    config = member_bytes("./model_config.yaml", NEMO_CONFIG)
    info = tarfile.TarInfo("./model_weights.ckpt")
    info.size = size
    raw = config + info.tobuf(format=tarfile.GNU_FORMAT) + VALID_WEIGHTS + bytes(1024)
    with example_dir() as d:
        path = d / "model.nemo"
        path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
        _, error = outcome(lambda: read_all(path), [str(path)], [d])
        assert error is not None


def pax_sparse_nemo(path: Path, realsize: int) -> Path:
    """A plain tar whose weights member is a PAX 1.0 sparse file: a few stored bytes, a
    ``realsize`` of holes that extraction would write out as zeros."""
    data = b"PK\x03\x04"
    sparse_map = f"1\n0\n{len(data)}\n".encode().ljust(512, b"\0")
    info = tarfile.TarInfo("./GNUSparseFile.0/model_weights.ckpt")
    info.size = len(sparse_map) + len(data)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "./model_weights.ckpt",
        "GNU.sparse.realsize": str(realsize),
    }
    config = member_bytes("./model_config.yaml", NEMO_CONFIG)
    member = info.tobuf(format=tarfile.PAX_FORMAT) + sparse_map + data + bytes(-len(sparse_map + data) % 512)
    path.write_bytes(config + member + bytes(1024))
    return path


@settings(max_examples=min(FUZZ_EXAMPLES, 6))
@given(st.integers(1 << 30, 1 << 40))
def test_nemo_sparse_member_is_refused(realsize: int) -> None:
    pytest.importorskip("nemo_merge.nemo_io")
    with example_dir() as d:
        path = pax_sparse_nemo(d / "sparse.nemo", realsize)
        with tarfile.open(path) as tar:  # the bomb is real: tarfile reads it as a huge member
            assert tar.getmember("./model_weights.ckpt").size == realsize
        _, error = outcome(lambda: read_all(path), [str(path)], [d])
        assert error is not None


def test_nemo_weights_larger_than_the_free_space_are_refused(monkeypatch: pytest.MonkeyPatch, valid_nemo: Path) -> None:
    import shutil

    from nemo_merge import nemo_io

    real = shutil.disk_usage
    monkeypatch.setattr(nemo_io.shutil, "disk_usage", lambda p: real(p)._replace(free=len(VALID_WEIGHTS) - 1))
    _, error = outcome(lambda: read_all(valid_nemo), [str(valid_nemo)], [valid_nemo.parent])
    assert error is not None and "free" in str(error)


# ----------------------------------------------------------------------------- SpeechBrain CKPT+ folders


@st.composite
def checkpointer_folders(draw: st.DrawFn) -> dict[str, bytes | None]:
    """File name -> bytes (None: the file is absent) of a CKPT+ folder, one or two files damaged."""
    files: dict[str, bytes | None] = {
        "CKPT.yaml": b"# yamllint disable\nend-of-epoch: true\nunixtime: 1700000000.0\nWER: 12.5\n",
        "model.ckpt": VALID_TORCH,
        "optimizer.ckpt": torch_bytes(
            {"state": {0: {"step": torch.tensor(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
        ),
        "counter.ckpt": b"5",
    }
    for _ in range(draw(st.integers(1, 2))):
        name = draw(st.sampled_from(["CKPT.yaml", "model.ckpt", "optimizer.ckpt", "extra.ckpt"]))
        if name == "CKPT.yaml":
            files[name] = draw(st.none() | config_texts)
        else:
            files[name] = draw(
                st.none()
                | st.just(b"")
                | byte_damage(VALID_TORCH)
                | st.builds(torch_bytes, pickle_trees | state_dicts)
                | st.binary(max_size=64)
            )
    return files


@given(checkpointer_folders())
def test_speechbrain_checkpoint_folder(files: dict[str, bytes | None]) -> None:
    pytest.importorskip("speechbrain_merge.checkpoint_io")
    with example_dir() as d:
        folder = d / "CKPT+2024-05-01+12-00-00+00"
        folder.mkdir()
        for name, data in files.items():
            if data is not None:
                (folder / name).write_bytes(data)
        result, _ = outcome(lambda: read_all(folder), [str(folder)], [d])
        if result is not None:
            recoverables = {n.split(".", 1)[0] for n in result}
            assert recoverables <= {"model", "optimizer", "extra", "counter"}


# ----------------------------------------------------------------------------- CTranslate2 Whisper folders

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startofprev|>",
    "<|notimestamps|>",
]
PLAIN_TOKENS = ["a", "b", "c", "d", "e", "f"]  # with the special tokens: the tiny model's 12 ids


@pytest.fixture(scope="module")
def ct2_files() -> dict[str, bytes]:
    """A tiny CTranslate2 Whisper folder that converts: model.bin, config.json, vocabulary, tokenizer.json."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from tests.merge_core.app.test_whisper_ct2 import TIED, tiny_whisper, write_ct2_model

    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(PLAIN_TOKENS + SPECIAL_TOKENS)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    with tempfile.TemporaryDirectory(dir=Path(tempfile.gettempdir()).parent) as d:
        write_ct2_model(Path(d) / "model.bin", tiny_whisper(), TIED)
        return {
            "model.bin": (Path(d) / "model.bin").read_bytes(),
            "config.json": json.dumps(
                {"suppress_ids": [1], "suppress_ids_begin": [2], "alignment_heads": [[0, 0]]}
            ).encode(),
            "vocabulary.txt": ("\n".join(PLAIN_TOKENS + SPECIAL_TOKENS) + "\n").encode(),
            "tokenizer.json": tokenizer.to_str().encode(),
        }


@st.composite
def ct2_model_bin(draw: st.DrawFn, data: bytes) -> bytes:
    """model.bin with damaged bytes, or one of its u8/u16/u32 fields (a rank, a dim, a
    dtype id, a byte count, a string length, a count) overwritten with a generated value."""
    if draw(st.booleans()):
        return draw(byte_damage(data))
    at = draw(st.integers(0, len(data) - 4))
    fmt = draw(st.sampled_from(["<B", "<H", "<I"]))
    value = draw(st.integers(0, 2 ** (8 * struct.calcsize(fmt)) - 1))
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt) :]


@st.composite
def ct2_variables(draw: st.DrawFn) -> bytes:
    """model.bin, well-formed, of a tiny Whisper with some variables reshaped, retyped,
    revalued, renamed or dropped, or aliases pointing anywhere."""
    from tests.merge_core.app.test_whisper_ct2 import TIED, tiny_whisper, write_ct2_model

    variables, aliases = tiny_whisper(), dict(TIED)
    for _ in range(draw(st.integers(1, 3))):
        shaping = [n for n in variables if "layer_" not in n or "linear_0" in n]  # the ones sizes are read from
        name = draw(st.sampled_from(sorted(shaping)) | st.sampled_from(sorted(variables)))
        value = variables.pop(name)
        how = draw(st.sampled_from(["reshape", "dtype", "value", "rename", "drop", "alias"]))
        if how == "reshape":
            dims = draw(st.lists(st.integers(0, 4), max_size=3))
            value = np.resize(value, dims)
        elif how == "dtype":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # inf and nan cast to integers
                value = value.astype(draw(st.sampled_from(["float32", "float16", "int8", "int16", "int32"])))
        elif how == "value":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # inf and nan cast to integers
                value = np.full(
                    value.shape, draw(st.sampled_from([0, 1, -1, 3, 127, np.inf, np.nan])), dtype=value.dtype
                )
        elif how == "rename":
            name = draw(
                st.sampled_from(
                    ["encoder/layer_7/ffn/linear_0/weight", "decoder/layer_0/x", "decoder/num_heads", name + "x"]
                )
            )
        elif how == "alias":
            aliases[draw(st.sampled_from(["decoder/projection/weight", name, "x"]))] = draw(
                st.sampled_from([name, "nowhere", "decoder/projection/weight"])
            )
        if how != "drop":
            variables[name] = value
    with tempfile.TemporaryDirectory(dir=Path(tempfile.gettempdir()).parent) as d:
        return write_ct2_model(Path(d) / "model.bin", variables, aliases).read_bytes()


@st.composite
def ct2_damage(draw: st.DrawFn, files: dict[str, bytes]) -> dict[str, bytes | None]:
    files = dict(files)
    what = draw(
        st.sampled_from(["model.bin", "variables", "config.json", "vocabulary.txt", "vocabulary.json", "missing"])
    )
    if what == "model.bin":
        files[what] = draw(ct2_model_bin(files[what]))
    elif what == "variables":
        files["model.bin"] = draw(ct2_variables())
    elif what == "config.json":
        entry = st.fixed_dictionaries(
            {}, optional={k: json_values for k in ("suppress_ids", "suppress_ids_begin", "alignment_heads")}
        )
        files[what] = draw(
            entry.map(lambda v: json.dumps(v).encode())
            | json_values.map(lambda v: json.dumps(v).encode())
            | st.binary(max_size=20)
        )
    elif what == "vocabulary.txt":
        tokens = PLAIN_TOKENS + SPECIAL_TOKENS
        files[what] = draw(
            st.binary(max_size=40)
            | st.builds(lambda t: ("\n".join(t) + "\n").encode("latin-1"), st.permutations(tokens + ["é"]))
        )
    elif what == "vocabulary.json":
        files["vocabulary.txt"] = None
        files[what] = draw(json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=20))
    else:
        files[draw(st.sampled_from(["model.bin", "config.json", "vocabulary.txt", "tokenizer.json"]))] = None
    return files


@given(st.data())
def test_ctranslate2_whisper_folder(ct2_files: dict[str, bytes], data: st.DataObject) -> None:
    from merge_core.app.pretrained.whisper_ct2 import OUTPUT_FILES, convert_ct2_whisper

    files = data.draw(ct2_damage(ct2_files))
    with example_dir() as d:
        ct2 = d / "ct2"
        ct2.mkdir()
        for name, content in files.items():
            if content is not None:
                (ct2 / name).write_bytes(content)
        out = d / "out" / "hf"
        result, _ = outcome(lambda: convert_ct2_whisper(ct2, out), [str(ct2)], [ct2])
        if result is None:
            assert not out.parent.exists() or list(out.parent.iterdir()) == []
        else:
            assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)


# ----------------------------------------------------------------------------- the command line


def merge_recipe(folder: Path, models: list[Path], output: Path) -> Path:
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "average", "models": [str(m) for m in models], "output": str(output)}))
    return recipe


@settings(max_examples=min(FUZZ_EXAMPLES, 50))
@given(
    st.one_of(
        damaged_safetensors.map(lambda b: ("model.safetensors", b)),
        byte_damage(VALID_TORCH).map(lambda b: ("model.pt", b)),
    )
)
def test_cli_merge_of_a_damaged_checkpoint(capsys: pytest.CaptureFixture, damaged: tuple[str, bytes]) -> None:
    from merge_core.app.cli import main

    name, data = damaged
    with example_dir() as d:
        (d / "good.safetensors").write_bytes(VALID_SAFETENSORS)
        (d / name).write_bytes(data)
        output = d / "out" / "merged.safetensors"
        recipe = merge_recipe(d, [d / "good.safetensors", d / name], output)
        capsys.readouterr()
        before = tree(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a legacy torch file's warning
            code, _ = outcome(lambda: main(["merge", str(recipe), "--quiet"]), [], [])
        out, err = capsys.readouterr()
        event(f"exit code {code}")
        assert "Traceback" not in out + err
        if code == 0:  # odd but readable, and compatible with the good model: merged
            assert [p.name for p in output.parent.iterdir()] == ["merged.safetensors"]
            return
        assert code == 2, err
        assert err.startswith("asr-merge: error:") and (str(d / name) in err or str(d / "good.safetensors") in err), err
        assert tree(d) == before and not output.exists()


def test_cli_subprocess_shows_no_traceback_for_a_corrupt_safetensors(tmp_path: Path) -> None:
    (tmp_path / "good.safetensors").write_bytes(VALID_SAFETENSORS)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(struct.pack("<Q", 2**40) + VALID_SAFETENSORS[8:])  # header length far beyond the file
    output = tmp_path / "merged.safetensors"
    recipe = merge_recipe(tmp_path, [tmp_path / "good.safetensors", corrupt], output)
    before = tree(tmp_path)
    run = subprocess.run(
        [ASR_MERGE, "merge", str(recipe), "--quiet"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("asr-merge: error:") and "Traceback" not in run.stderr + run.stdout
    assert str(corrupt) in run.stderr and "corrupt" in run.stderr
    assert tree(tmp_path) == before and not output.exists()
