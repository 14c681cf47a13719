"""NeMo and SpeechBrain manifests from a LibriSpeech-layout folder (the real one or ours).

Input: ``root/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` with lines
``<utterance id> <TRANSCRIPT>`` and ``<utterance id>.flac`` beside it.

- NeMo, as ``scripts/dataset_processing/get_librispeech_data.py`` writes it:
  ``<split with _>.json`` (``dev_clean.json``), JSON lines of absolute
  ``audio_filepath``, ``duration`` (s) and lower-case ``text``. The audio stays FLAC:
  NeMo's script converts to WAV, but NeMo 3.0 reads FLAC itself (``AudioSegment``
  opens files with soundfile, lhotse likewise), so a WAV copy would only double the disk.
- SpeechBrain, as ``recipes/LibriSpeech/librispeech_prepare.py`` writes it:
  ``<split>.csv`` (``dev-clean.csv``) with columns ``ID,duration,wav,spk_id,wrd``,
  ``spk_id`` being ``<speaker>-<chapter>`` and ``wrd`` the upper-case transcript.

Utterances come from the transcripts, not from globbing audio, so stray files in the
tree are ignored and a transcript line without its audio is an error.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from merge_core.errors import CorpusError
from merge_core.app.corpus.files import flac_duration
from merge_core.atomic import write_text_atomically

TOOLKITS = ("nemo", "speechbrain")
# <split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt, relative to the split folder
TRANSCRIPTS = "*/*/*.trans.txt"
SPEECHBRAIN_HEADER = ("ID", "duration", "wav", "spk_id", "wrd")


@dataclass(frozen=True)
class LibriUtterance:
    """One transcript line with its audio file and duration."""

    id: str
    audio: Path
    duration: float
    text: str  # upper case, as in the transcript

    @property
    def speaker_chapter(self) -> str:
        """SpeechBrain's ``spk_id``: ``<speaker>-<chapter>``."""
        return "-".join(self.id.split("-")[:2])


def find_splits(root: Path) -> list[str]:
    """The split folders of ``root`` that hold transcripts at LibriSpeech's depth, sorted."""
    if not root.is_dir():
        raise CorpusError(f"{root}: no such folder")
    splits = sorted(p.name for p in root.iterdir() if p.is_dir() and next(p.glob(TRANSCRIPTS), None))
    if not splits:
        raise CorpusError(
            f"{root}: no split folder with <speaker>/<chapter>/*.trans.txt found "
            "(give the folder holding train-clean-100/, dev-clean/, ...)"
        )
    return splits


def read_transcript(path: Path) -> list[LibriUtterance]:
    """The utterances of one ``.trans.txt``; errors name the file and line."""
    utterances = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        utterance_id, _, text = line.strip().partition(" ")
        audio = path.parent / f"{utterance_id}.flac"
        if not text.strip():
            raise CorpusError(f"{path}:{number}: no transcript after ID {utterance_id!r}")
        if not audio.is_file():
            raise CorpusError(f"{path}:{number}: audio {str(audio)!r} does not exist")
        utterances.append(LibriUtterance(utterance_id, audio.absolute(), flac_duration(audio), " ".join(text.split())))
    return utterances


def read_split(folder: Path) -> list[LibriUtterance]:
    """Every utterance under a split folder, sorted by ID."""
    if not folder.is_dir():
        raise CorpusError(f"{folder}: no such split folder")
    utterances = [u for path in sorted(folder.glob(TRANSCRIPTS)) for u in read_transcript(path)]
    if not utterances:
        raise CorpusError(f"{folder}: no transcripts (<speaker>/<chapter>/*.trans.txt) found")
    return sorted(utterances, key=lambda u: u.id)


def nemo_manifest(utterances: Sequence[LibriUtterance]) -> str:
    """NeMo's JSON lines for ``utterances``."""
    return "".join(
        json.dumps({"audio_filepath": str(u.audio), "duration": u.duration, "text": u.text.lower()}) + "\n"
        for u in utterances
    )


def speechbrain_csv(utterances: Sequence[LibriUtterance]) -> str:
    """SpeechBrain's CSV for ``utterances``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SPEECHBRAIN_HEADER)
    writer.writerows((u.id, str(u.duration), str(u.audio), u.speaker_chapter, u.text) for u in utterances)
    return buffer.getvalue()


def manifest_name(split: str, toolkit: str) -> str:
    """The file each toolkit's own preparation script names a split's manifest.

    >>> manifest_name("train-clean-100", "nemo"), manifest_name("train-clean-100", "speechbrain")
    ('train_clean_100.json', 'train-clean-100.csv')
    """
    return f"{split.replace('-', '_')}.json" if toolkit == "nemo" else f"{split}.csv"


def toolkits_for(toolkit: str) -> tuple[str, ...]:
    """``nemo``, ``speechbrain`` or ``both`` as the toolkits to write for."""
    if toolkit == "both":
        return TOOLKITS
    if toolkit not in TOOLKITS:
        raise CorpusError(f"toolkit must be nemo, speechbrain or both, got {toolkit!r}")
    return (toolkit,)


def prepare_librispeech(
    root: str | Path, out_dir: str | Path, splits: Sequence[str] | None = None, toolkit: str = "both"
) -> dict[str, dict[str, Path]]:
    """Write NeMo and/or SpeechBrain manifests for a LibriSpeech-layout folder.

    Parameters
    ----------
    root : str or Path
        The folder holding split folders: the real ``LibriSpeech/``, or a folder of the
        synthetic corpus (``LibriSpeech/``, ``noisy/``, ...).
    out_dir : str or Path
        Where the manifests go (created if missing); each is written atomically.
    splits : sequence of str, optional
        Split folders to prepare; default: every folder of ``root`` holding transcripts.
    toolkit : str
        ``nemo``, ``speechbrain`` or ``both``.

    Returns
    -------
    dict
        ``{split: {toolkit: manifest path}}``.
    """
    root, out_dir = Path(root), Path(out_dir)
    chosen = toolkits_for(toolkit)
    writers = {"nemo": nemo_manifest, "speechbrain": speechbrain_csv}
    written: dict[str, dict[str, Path]] = {}
    for split in splits or find_splits(root):
        utterances = read_split(root / split)
        for kit in chosen:
            path = out_dir / manifest_name(split, kit)
            write_text_atomically(path, writers[kit](utterances))
            written.setdefault(split, {})[kit] = path
    return written
