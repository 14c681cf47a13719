"""Synthetic speakers: an espeak-ng English accent, a voice variant, a speaking rate and a pitch.

The lists are fixed here rather than read from the installed espeak-ng so that a seed
names the same corpus on every machine (espeak-ng 1.51's ``espeak-ng --voices=en``
and ``--voices=variant`` list them; the MBROLA voices need extra packages and are left out).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

# LibriSpeech is read North American and British English.
ORIGINAL_ACCENTS = ("en-us", "en-gb", "en-gb-x-rp")
# The accent domain's: Scottish, Lancastrian, West Midlands, Caribbean, New York City.
TARGET_ACCENTS = ("en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")

# Variants that sound like a plain human voice: formant-synthesis settings without
# robotic echo or Klatt synthesis. Left out too: Andy, Gene, Gene2, Jacky, belinda,
# gustave and john, which drive espeak-ng to full scale and clip in a third or more
# of their utterances.
CLEAN_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "Alex", "Annie", "Denis", "Lee", "Mario", "Michael", "Mike", "aunty", "boris", "linda",
    "marcelo", "max", "quincy", "rob", "robert", "shelby", "steph", "travis", "victor",
)  # fmt: skip
# LibriSpeech's "other" speakers were those a recogniser found hard: here whispered,
# croaky, elderly and Klatt-synthesised voices.
HARD_VARIANTS = (
    "whisper", "whisperf", "croak", "grandma", "grandpa", "klatt", "klatt2", "klatt3", "klatt4",
    "adam", "david", "edward",
)  # fmt: skip


@dataclass(frozen=True)
class VoicePool:
    """Where a split's speakers come from: accents x variants, with rate and pitch ranges."""

    accents: tuple[str, ...]
    variants: tuple[str, ...]
    speed: tuple[int, int] = (145, 180)  # words per minute
    pitch: tuple[int, int] = (30, 70)  # espeak-ng's 0-99 scale

    @property
    def capacity(self) -> int:
        """How many distinct (accent, variant) speakers the pool holds."""
        return len(self.accents) * len(self.variants)


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: ``voice`` is espeak-ng's ``accent+variant``."""

    id: int
    voice: str
    speed: int
    pitch: int


CLEAN = VoicePool(ORIGINAL_ACCENTS, CLEAN_VARIANTS)
HARD = VoicePool(ORIGINAL_ACCENTS, HARD_VARIANTS, speed=(170, 210))
ACCENTED = VoicePool(TARGET_ACCENTS, CLEAN_VARIANTS)


def voice_order(pool: VoicePool, rng: random.Random) -> list[str]:
    """Every ``accent+variant`` voice of ``pool`` once, shuffled by ``rng``, accents interleaved.

    Interleaving the accents keeps each split's speakers spread over all of them.

    >>> order = voice_order(VoicePool(("en-us", "en-gb"), ("m1", "f1", "m2")), random.Random(0))
    >>> len(order), [voice.split("+")[0] for voice in order[:4]]
    (6, ['en-us', 'en-gb', 'en-us', 'en-gb'])
    """
    by_accent = []
    for accent in pool.accents:
        variants = list(pool.variants)
        rng.shuffle(variants)
        by_accent.append([f"{accent}+{v}" for v in variants])
    return [v for group in itertools.zip_longest(*by_accent) for v in group if v is not None]


def make_speaker(speaker_id: int, voice: str, pool: VoicePool, rng: random.Random) -> Speaker:
    """A speaker with ``voice`` and a rate and pitch drawn from ``pool``'s ranges."""
    return Speaker(id=speaker_id, voice=voice, speed=rng.randint(*pool.speed), pitch=rng.randint(*pool.pitch))
