"""Evaluation manifests of both toolkits, read into one toolkit-free form.

NeMo: JSON lines with ``audio_filepath``, ``duration``, ``text``; a relative
``audio_filepath`` is resolved against the manifest's folder, as NeMo's datasets do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
        audio = Path(entry["audio_filepath"])
        duration = entry.get("duration")
        utterances.append(
            Utterance(
                audio=audio if audio.is_absolute() else path.parent / audio,
                text=str(entry["text"]),
                duration=None if duration is None else float(duration),
            )
        )
    if not utterances:
        raise ManifestError(f"{path}: manifest holds no utterances")
    return utterances


def check_audio(utterances: list[Utterance], manifest: str | Path) -> None:
    """Fail early, naming the manifest and file, if any audio is missing or unreadable."""
    import soundfile

    for u in utterances:
        if not u.audio.is_file():
            raise ManifestError(f"{manifest}: audio file {str(u.audio)!r} does not exist")
        try:
            soundfile.info(str(u.audio))
        except (RuntimeError, soundfile.LibsndfileError) as e:
            raise ManifestError(f"{manifest}: audio file {str(u.audio)!r} is unreadable ({e})") from None
