"""Speech synthesized with espeak-ng: real, offline, deterministic audio for tests and demos.

``synthesize`` writes a 16 kHz mono 16-bit PCM WAV, what NeMo and SpeechBrain ASR
recipes read. espeak-ng writes 22050 Hz, so the file is resampled by ``sox`` when it
is installed, else by ``torchaudio.functional.resample``. Toolkit-free: no NeMo or
SpeechBrain import, and torchaudio only on the fallback path.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

INSTALL_HINT = "apt-get install espeak-ng sox"


def synthesize(
    text: str,
    path: str | Path,
    voice: str = "en-us",
    speed: int = 160,
    pitch: int = 50,
    sample_rate: int = 16000,
) -> float:
    """Speak ``text`` into ``path`` (16-bit mono WAV at ``sample_rate``); returns its duration in seconds.

    ``voice`` is an espeak-ng voice (``espeak-ng --voices=en`` lists them, e.g. ``en-us``,
    ``en-gb``, ``en-us+f3``), ``speed`` is words per minute, ``pitch`` 0-99. The same
    inputs give the same bytes: espeak-ng is deterministic and the resampling is not dithered.
    """
    if not text.strip():
        raise ValueError("synthesize: text is empty")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="espeak-") as tmp:
        raw = Path(tmp) / "espeak.wav"
        _espeak(text, raw, voice, speed, pitch)
        if shutil.which("sox"):
            _resample_sox(raw, path, sample_rate)
        else:
            _resample_torchaudio(raw, path, sample_rate)
    return wav_duration(path)


def wav_duration(path: str | Path) -> float:
    """Seconds of audio in a PCM WAV file, from its header."""
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


def _espeak(text: str, out: Path, voice: str, speed: int, pitch: int) -> None:
    """Run espeak-ng into ``out``. The text goes through stdin so that one starting
    with ``-`` is not taken for an option."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(f"espeak-ng is not installed (on Debian/Ubuntu: {INSTALL_HINT})")
    cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), "--stdin"]
    done = subprocess.run(cmd, input=text, capture_output=True, text=True)
    # espeak-ng exits 0 for an unknown voice, but writes nothing and complains on stderr
    if done.returncode != 0 or not out.is_file() or out.stat().st_size <= 44:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {done.stderr.strip() or 'no audio written'}")


def _resample_sox(src: Path, dest: Path, sample_rate: int) -> None:
    """Resample and downmix with sox. ``-D``: no dither, whose noise would make the
    output differ between runs."""
    cmd = ["sox", "-D", str(src), "-r", str(sample_rate), "-c", "1", "-b", "16", "-e", "signed-integer", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sox failed on {src}: {done.stderr.strip()}")


def _resample_torchaudio(src: Path, dest: Path, sample_rate: int) -> None:
    """Resample and downmix with torchaudio's sinc resampler; WAV I/O by the standard
    library, since torchaudio's own loaders moved to torchcodec in recent releases."""
    try:
        import torch
        from torchaudio.functional import resample
    except ImportError as err:
        raise RuntimeError(f"resampling needs sox or torchaudio (on Debian/Ubuntu: {INSTALL_HINT})") from err
    with wave.open(str(src), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise RuntimeError(f"{src}: expected 16-bit PCM from espeak-ng, got {8 * wav.getsampwidth()}-bit")
        channels, rate = wav.getnchannels(), wav.getframerate()
        pcm = torch.frombuffer(bytearray(wav.readframes(wav.getnframes())), dtype=torch.int16)
    audio = pcm.view(-1, channels).float().mean(dim=1) / 32768.0
    audio = resample(audio, rate, sample_rate)
    out = (audio * 32768.0).round().clamp(-32768, 32767).to(torch.int16)
    with wave.open(str(dest), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(out.numpy().tobytes())
