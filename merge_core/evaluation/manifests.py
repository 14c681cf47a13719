"""Evaluation manifests of both toolkits, read into one toolkit-free form.

NeMo: JSON lines with ``audio_filepath``, ``duration``, ``text``; a relative
``audio_filepath`` is resolved against the manifest's folder, as NeMo's datasets do.

SpeechBrain: CSV with ``ID``, ``wav`` and ``wrd`` columns (``librispeech_prepare.py``
writes ``ID,duration,wav,spk_id,wrd``); ``$name`` placeholders are replaced as
SpeechBrain's ``load_data_csv`` does, and a relative ``wav`` is relative to the working
directory, where SpeechBrain opens it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from merge_core.errors import ManifestError


@dataclass(frozen=True)
class Utterance:
    """One test utterance: its audio file, reference transcript and duration (s)."""

    audio: Path
    text: str
    duration: float | None = None


def read_nemo_manifest(path: str | Path) -> list[Utterance]:
    """Read a NeMo JSONL manifest; errors name the file and line.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> _ = open(os.path.join(d, "m.json"), "w").write('{"audio_filepath": "a.wav", "duration": 1.5, "text": "hi"}\\n')
    >>> read_nemo_manifest(os.path.join(d, "m.json"))[0].audio == Path(d) / "a.wav"
    True
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read manifest ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    utterances = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{number}: not a JSON object ({e.msg})") from None
        missing = [k for k in ("audio_filepath", "text") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ManifestError(f"{path}:{number}: entry lacks {', '.join(repr(k) for k in missing)}")
        wrong = [k for k in ("audio_filepath", "text") if not isinstance(entry[k], str)] or (
            ["audio_filepath"] if not entry["audio_filepath"] else []
        )
        if wrong:
            raise ManifestError(f"{path}:{number}: {wrong[0]!r} must be a non-empty string, got {entry[wrong[0]]!r}")
        audio = Path(entry["audio_filepath"])
        utterances.append(
            Utterance(
                audio=audio if audio.is_absolute() else path.parent / audio,
                text=entry["text"],
                duration=_duration(entry.get("duration"), f"{path}:{number}"),
            )
        )
    if not utterances:
        raise ManifestError(f"{path}: manifest holds no utterances")
    return utterances


SPEECHBRAIN_COLUMNS = ("ID", "wav", "wrd")
# SpeechBrain's own placeholder pattern (speechbrain.dataio.dataio.load_data_csv)
_PLACEHOLDER = re.compile(r"\$([\w.]+)")


def _replace_placeholders(value: str, replacements: Mapping[str, str], where: str) -> str:
    def replace(match: re.Match) -> str:
        if match[1] not in replacements:
            known = ", ".join(sorted(replacements)) or "none given"
            raise ManifestError(f"{where}: {value!r} needs a value for ${match[1]} (replacements: {known})")
        return str(replacements[match[1]])

    return _PLACEHOLDER.sub(replace, value)


def _duration(value: Any, where: str) -> float | None:
    """A duration in seconds (a number, or its text in a CSV) that is finite and >= 0; None when absent."""
    if value is None:
        return None
    try:
        seconds = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ManifestError(f"{where}: duration {value!r} is not a number of seconds >= 0")
    return seconds


def _escapes(path: str, root: str) -> bool:
    """Whether ``path``, once its '..' are resolved, lies outside ``root`` (both taken as written)."""
    inside = os.path.relpath(os.path.normpath(path), os.path.normpath(root))
    return inside == os.pardir or inside.startswith(os.pardir + os.sep)


def _csv_utterance(row: dict, replacements: Mapping[str, str], where: str) -> Utterance:
    # DictReader pads a short row with None and files a long row's surplus under None
    if None in row or None in row.values():
        raise ManifestError(f"{where}: row does not have one field per column of the header")
    duration = _duration(row.get("duration") or None, where)
    wav = _replace_placeholders(row["wav"], replacements, where)
    # a row under a root placeholder ($data_root/...) must stay under that root
    root = _PLACEHOLDER.match(row["wav"])
    if root and _escapes(wav, str(replacements[root[1]])):
        raise ManifestError(f"{where}: wav {row['wav']!r} leaves ${root[1]} ({replacements[root[1]]}) through '..'")
    return Utterance(
        audio=Path(wav).absolute(), text=_replace_placeholders(row["wrd"], replacements, where), duration=duration
    )


def read_speechbrain_csv(path: str | Path, replacements: Mapping[str, str] | None = None) -> list[Utterance]:
    """Read a SpeechBrain CSV manifest; errors name the file, line and column.

    ``replacements`` fill ``$name`` placeholders, e.g. ``{"data_root": "/data"}`` for
    rows written as ``$data_root/LibriSpeech/...``, as SpeechBrain's recipes pass them to
    ``DynamicItemDataset.from_csv``.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> rows = "ID,duration,wav,spk_id,wrd\\n1-2-3,1.5,$data_root/a.wav,1,HI THERE\\n"
    >>> _ = open(os.path.join(d, "t.csv"), "w").write(rows)
    >>> u = read_speechbrain_csv(os.path.join(d, "t.csv"), {"data_root": "/data"})[0]
    >>> str(u.audio), u.text, u.duration
    ('/data/a.wav', 'HI THERE', 1.5)
    """
    path = Path(path)
    utterances, seen = [], set()
    for line, row in _csv_rows(path):
        where = f"{path}:{line}"
        if row["ID"] in seen:
            raise ManifestError(f"{where}: duplicate ID {row['ID']!r}")
        seen.add(row["ID"])
        utterances.append(_csv_utterance(row, replacements or {}, where))
    if not utterances:
        raise ManifestError(f"{path}: manifest holds no utterances")
    return utterances


def _csv_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV whose header has the SpeechBrain columns."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            header = reader.fieldnames or []
            missing = [c for c in SPEECHBRAIN_COLUMNS if c not in header]
            if missing:
                lacking, found = ", ".join(map(repr, missing)), ", ".join(header) or "empty"
                raise ManifestError(f"{path}: CSV lacks column(s) {lacking} (header: {found})")
            return [(reader.line_num, row) for row in reader]
    except OSError as e:
        raise ManifestError(f"{path}: cannot read manifest ({e.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not a readable CSV ({e})") from None


# Utterances are decoded whole, and a Conformer's attention grows with the square of
# the length: five minutes (LibriSpeech's longest is 35 s) keeps the tiny and the
# 1.1B models within a few GB; longer audio is segmented first, as in long-form recipes.
DEFAULT_MAX_DURATION = 300.0


def check_audio(
    utterances: list[Utterance], manifest: str | Path, max_duration: float | None = DEFAULT_MAX_DURATION
) -> None:
    """Fail early, naming the manifest and file, if any audio is missing, unreadable, or
    (by its header, not the manifest's word) longer than ``max_duration`` seconds."""
    import soundfile

    for u in utterances:
        if not u.audio.is_file():
            raise ManifestError(f"{manifest}: audio file {str(u.audio)!r} does not exist")
        try:
            seconds = soundfile.info(str(u.audio)).duration
        except (RuntimeError, soundfile.LibsndfileError) as e:
            raise ManifestError(f"{manifest}: audio file {str(u.audio)!r} is unreadable ({e})") from None
        if max_duration is not None and seconds > max_duration:
            raise ManifestError(
                f"{manifest}: audio file {str(u.audio)!r} lasts {seconds:.0f} s, longer than max_duration="
                f"{max_duration:g} s: decoded whole it would need memory growing with the square of its length; "
                "split it into segments, or raise max_duration in the evaluation config"
            )
