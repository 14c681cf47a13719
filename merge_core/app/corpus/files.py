"""Reading FLAC headers."""

from __future__ import annotations

import struct
from pathlib import Path

from merge_core.errors import CorpusError


def flac_info(path: Path) -> tuple[int, int, int]:
    """(sample rate, channels, frames) from a FLAC file's STREAMINFO block.

    Read from the 42-byte header, so timing a corpus of many files does not decode them.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(42)
    except OSError as e:
        raise CorpusError(f"{path}: cannot read audio ({e.strerror})") from None
    if len(head) < 42 or head[:4] != b"fLaC" or head[4] & 0x7F != 0:
        raise CorpusError(f"{path}: not a FLAC file")
    # STREAMINFO bytes 10-17: rate (20 bits), channels-1 (3), bits-1 (5), frames (36)
    packed = struct.unpack(">Q", head[18:26])[0]
    return packed >> 44, ((packed >> 41) & 0x7) + 1, packed & (2**36 - 1)


def flac_duration(path: Path) -> float:
    """Seconds of audio in a FLAC file, from its header."""
    rate, _, frames = flac_info(path)
    return frames / rate
