"""Acoustic conditions applied to clean synthetic speech, WAV to WAV, and FLAC encoding.

Each effect is a function ``(src, dest, params, seed)`` named in :data:`EFFECTS`, so an
utterance's conditions are plain data (``{"effect": "noise", "color": "pink",
"snr_db": 5.0}``) that the plan records and the renderer replays. ``sox`` runs
without dither (``-D``) and the noise comes from a seeded generator, so the same
inputs give the same bytes.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from merge_core.errors import CorpusError

SAMPLE_RATE = 16000
# Spectral slope of each noise colour: power ~ 1 / f ** exponent.
NOISE_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}
# Telephone codecs sox writes at 8 kHz, as (file type, encoding options): G.711 mu-law
# in WAV and GSM 06.10 full rate.
CODECS = {"ulaw": ("wav", ["-e", "u-law"]), "gsm": ("gsm", [])}


def run_sox(args: list[str], what: Path) -> None:
    """Run ``sox -D args``; errors name ``what``, the file being made."""
    if shutil.which("sox") is None:
        raise CorpusError(f"{what}: sox is not installed (on Debian/Ubuntu: apt-get install sox)")
    done = subprocess.run(["sox", "-D", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CorpusError(f"{what}: sox failed: {done.stderr.strip()}")


def read_wav(path: Path) -> np.ndarray:
    """A 16-bit mono WAV's samples as float64 in [-1, 1)."""
    with wave.open(str(path), "rb") as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return pcm.astype(np.float64) / 32768.0


def write_wav(path: Path, samples: np.ndarray) -> None:
    """Write float samples as 16-bit mono WAV at :data:`SAMPLE_RATE`."""
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(pcm.tobytes())


def colored_noise(length: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise whose power spectrum falls as 1/f**exponent (white, pink, brown).

    >>> n = colored_noise(16000, "pink", np.random.default_rng(0))
    >>> round(float(np.mean(n ** 2)), 6)
    1.0
    """
    spectrum = np.fft.rfft(rng.standard_normal(length))
    freqs = np.fft.rfftfreq(length)
    freqs[0] = freqs[1]  # no infinite gain at DC
    noise = np.fft.irfft(spectrum / freqs ** (NOISE_EXPONENTS[color] / 2), n=length)
    return noise / np.sqrt(np.mean(noise**2))


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``speech`` plus ``noise`` scaled to ``snr_db`` below it (power over the whole
    utterance); the sum is scaled down together if it would clip, which keeps the SNR.

    >>> s = np.sin(np.arange(1000) / 5) / 2
    >>> mixed = mix_at_snr(s, np.random.default_rng(0).standard_normal(1000), 10.0)
    >>> scale = np.dot(mixed, s) / np.dot(s, s)
    >>> round(float(10 * np.log10(np.sum((scale * s) ** 2) / np.sum((mixed - scale * s) ** 2))), 1)
    10.0
    """
    gain = np.sqrt(np.mean(speech**2) / (np.mean(noise**2) * 10 ** (snr_db / 10)))
    mixed = speech + gain * noise
    peak = np.max(np.abs(mixed))
    return mixed * (0.9 / peak) if peak > 0.9 else mixed


def add_noise(src: Path, dest: Path, params: Mapping[str, Any], seed: int) -> None:
    """Noisy VCTK's condition: coloured noise at ``params["snr_db"]``."""
    speech = read_wav(src)
    noise = colored_noise(len(speech), params["color"], np.random.default_rng(seed))
    write_wav(dest, mix_at_snr(speech, noise, float(params["snr_db"])))


def telephone(src: Path, dest: Path, params: Mapping[str, Any], seed: int) -> None:
    """A telephone channel: 300-3400 Hz band, 8 kHz, a narrow-band codec, back to 16 kHz."""
    kind, encoding = CODECS[params["codec"]]
    coded = dest.with_name(f"{dest.name}.{kind}")
    run_sox([str(src), "-r", "8000", "-t", kind, *encoding, str(coded), "sinc", "300-3400"], dest)
    run_sox(
        ["-t", kind, str(coded), "-r", str(SAMPLE_RATE), "-e", "signed-integer", "-b", "16", "-t", "wav", str(dest)],
        dest,
    )
    coded.unlink()


def reverb(src: Path, dest: Path, params: Mapping[str, Any], seed: int) -> None:
    """A reverberant room (sox's freeverb), wet and dry mixed."""
    run_sox([str(src), "-t", "wav", str(dest), "reverb", str(params["reverberance"])], dest)


Effect = Callable[[Path, Path, Mapping[str, Any], int], None]
EFFECTS: dict[str, Effect] = {"noise": add_noise, "telephone": telephone, "reverb": reverb}


def encode_flac(src: Path, dest: Path) -> None:
    """Encode a 16 kHz mono WAV as 16-bit FLAC (what LibriSpeech ships)."""
    run_sox([str(src), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-t", "flac", str(dest)], dest)
