"""The synthetic corpus's domains and sizes: one "original" domain laid out as
LibriSpeech, and target domains that each differ from it in one way, as the paper's do.

| folder | imitates | differs from the original by |
|---|---|---|
| ``LibriSpeech`` | LibriSpeech (``test-other``: harder voices, reverberant rooms) | - |
| ``accented`` | Google NE, VCTK's accents | accents espeak-ng has but LibriSpeech's speakers do not |
| ``noisy`` | Noisy VCTK (VoiceBank + DEMAND) | coloured noise at VoiceBank + DEMAND's SNRs |
| ``telephone`` | device and channel mismatch (DiPCo) | 300-3400 Hz, 8 kHz, G.711 mu-law or GSM codec |
| ``emotional`` | JL Corpus | a few repeated phrases in five emotions (rate and pitch) |
| ``finance`` | SPGISpeech | earnings-call vocabulary: figures, tickers spelled out |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from merge_core.app.corpus.voices import ACCENTED, CLEAN, HARD, VoicePool

ORIGINAL = "LibriSpeech"


@dataclass(frozen=True)
class Style:
    """A way of speaking: espeak-ng's rate scaled by ``speed``, its pitch moved by ``pitch``."""

    name: str
    speed: float = 1.0
    pitch: int = 0


NEUTRAL = Style("neutral")
# JL Corpus's five primary emotions, as prosody: sad is slow and low, excited fast and high.
EMOTIONS = (
    NEUTRAL,
    Style("happy", speed=1.15, pitch=15),
    Style("sad", speed=0.7, pitch=-15),
    Style("angry", speed=1.3, pitch=5),
    Style("excited", speed=1.45, pitch=25),
)


@dataclass(frozen=True)
class Condition:
    """How one utterance is spoken (``style``) and what happens to it after (``effects``,
    each ``{"effect": name, ...parameters}`` as :data:`merge_core.app.corpus.effects.EFFECTS` takes)."""

    style: Style = NEUTRAL
    effects: tuple[dict[str, Any], ...] = ()


CLEAN_CONDITIONS = (Condition(),)


def noise_conditions(snrs: tuple[float, ...]) -> tuple[Condition, ...]:
    """Every noise colour at every SNR in ``snrs``."""
    return tuple(
        Condition(effects=({"effect": "noise", "color": color, "snr_db": snr},))
        for color in ("white", "pink", "brown")
        for snr in snrs
    )


@dataclass(frozen=True)
class SplitDesign:
    """A split's folder name, its speaker pool and the conditions its utterances cycle through."""

    name: str
    voices: VoicePool = CLEAN
    conditions: tuple[Condition, ...] = CLEAN_CONDITIONS

    @property
    def evaluation(self) -> bool:
        """Dev and test splits: their sentences are never trained on, in any domain."""
        return not self.name.startswith("train")


@dataclass(frozen=True)
class Domain:
    """A corpus folder: what it imitates, how it differs, where its text comes from
    (``fortunes``, ``finance`` or ``phrases``) and its splits."""

    name: str
    imitates: str
    shift: str
    text: str
    splits: tuple[SplitDesign, ...]


def target_splits(
    voices: VoicePool = CLEAN,
    train: tuple[Condition, ...] = CLEAN_CONDITIONS,
    evaluation: tuple[Condition, ...] | None = None,
) -> tuple[SplitDesign, ...]:
    """A target domain's ``train``, ``dev`` and ``test``; dev and test share ``evaluation``
    conditions (default: the training ones)."""
    held_out = train if evaluation is None else evaluation
    return (
        SplitDesign("train", voices, train),
        SplitDesign("dev", voices, held_out),
        SplitDesign("test", voices, held_out),
    )


REVERBERANT = tuple(Condition(effects=({"effect": "reverb", "reverberance": r},)) for r in (20, 40, 60))
TELEPHONE = tuple(Condition(effects=({"effect": "telephone", "codec": c},)) for c in ("ulaw", "gsm"))

DOMAINS = (
    Domain(
        ORIGINAL,
        "LibriSpeech",
        "none: the generalist's domain (test-other: harder voices in reverberant rooms)",
        "fortunes",
        (
            SplitDesign("train-clean-100"),
            SplitDesign("dev-clean"),
            SplitDesign("test-clean"),
            SplitDesign("test-other", HARD, REVERBERANT),
        ),
    ),
    Domain(
        "accented",
        "Google NE, VCTK accents",
        "accent: five English accents unseen in LibriSpeech",
        "fortunes",
        target_splits(ACCENTED),
    ),
    Domain(
        "noisy",
        "Noisy VCTK (VoiceBank + DEMAND)",
        "added noise: white, pink and brown at 0-15 dB SNR (train), 2.5-17.5 dB (dev, test)",
        "fortunes",
        target_splits(
            train=noise_conditions((0.0, 5.0, 10.0, 15.0)), evaluation=noise_conditions((2.5, 7.5, 12.5, 17.5))
        ),
    ),
    Domain(
        "telephone",
        "channel mismatch (DiPCo's devices)",
        "channel: 300-3400 Hz band, 8 kHz G.711 mu-law or GSM, resampled to 16 kHz",
        "fortunes",
        target_splits(train=TELEPHONE),
    ),
    Domain(
        "emotional",
        "JL Corpus",
        "speaking rate and pitch: 20 phrases repeated in five emotions, shared by all splits",
        "phrases",
        target_splits(train=tuple(Condition(style=s) for s in EMOTIONS)),
    ),
    Domain(
        "finance",
        "SPGISpeech",
        "vocabulary: earnings-call sentences, figures and tickers spelled out",
        "finance",
        target_splits(),
    ),
)


@dataclass(frozen=True)
class SplitSize:
    """How many utterances a split has, spread evenly over how many speakers."""

    utterances: int
    speakers: int


# domain -> split -> size
Sizes = dict[str, dict[str, SplitSize]]


def _sizes(original: tuple[tuple[int, int], ...], target: tuple[tuple[int, int], ...]) -> Sizes:
    """Per-domain split sizes: ``original`` for LibriSpeech's four splits, ``target`` for
    every target domain's train, dev and test."""
    sizes: Sizes = {}
    for domain in DOMAINS:
        table = original if domain.name == ORIGINAL else target
        sizes[domain.name] = {split.name: SplitSize(*n) for split, n in zip(domain.splits, table, strict=True)}
    return sizes


# smoke: seconds to build, for CI; default: a tiny generalist and experts trained on
# 2 CPU cores; large: tens of hours, for a GPU.
SIZES = {
    "smoke": _sizes(((12, 3), (6, 2), (6, 2), (6, 2)), ((12, 3), (6, 2), (6, 2))),
    "default": _sizes(((3000, 25), (80, 5), (120, 6), (120, 6)), ((240, 8), (40, 3), (80, 4))),
    "large": _sizes(((20000, 60), (600, 10), (600, 10), (600, 12)), ((4000, 30), (300, 6), (300, 6))),
}
