"""Text normalisation applied to references and hypotheses before scoring.

Both sides go through the same :class:`TextNormalization`, so a WER measures
recognition errors rather than differences in casing, punctuation or (with
``english``) spelling conventions between a toolkit's vocabulary and the test set's
transcripts.
"""

from __future__ import annotations

import re
from functools import lru_cache
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from merge_core.errors import EvaluationError

# Underscore is a word character for ``\w`` but punctuation for a transcript.
_PUNCTUATION = re.compile(r"[^\w\s']|_")
# An apostrophe survives only between two word characters: "don't", "o'clock".
_LOOSE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")
# Typographic apostrophes would otherwise make "don’t" and "don't" two words.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def strip_punctuation(text: str) -> str:
    """Replace punctuation by spaces, keeping apostrophes inside words.

    A space rather than nothing, so that "well-known" scores as two words, as
    references spelled "well known" do.

    >>> strip_punctuation("Well-known, isn't it? 'Quoted' students' work.").split()
    ['Well', 'known', "isn't", 'it', 'Quoted', 'students', 'work']
    """
    text = _PUNCTUATION.sub(" ", text.translate(_APOSTROPHES))
    return _LOOSE_APOSTROPHE.sub(" ", text)


def collapse_whitespace(text: str) -> str:
    """One space between words, none at the ends.

    >>> collapse_whitespace("  a \\t b\\n")
    'a b'
    """
    return " ".join(text.split())


@lru_cache(maxsize=1)  # it loads a spelling table: build it once
def _english_normalizer() -> Callable[[str], str]:
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError as e:
        raise EvaluationError(
            f"normalization key 'english' needs the whisper-normalizer package ({e}); "
            "install it with `pip install whisper-normalizer`"
        ) from None
    return EnglishTextNormalizer()


@dataclass(frozen=True)
class TextNormalization:
    """How transcripts are normalised before scoring; call it on a string.

    ``english`` applies Whisper's ``EnglishTextNormalizer`` (spelled-out numbers to
    digits, "Mr." to "mister", British to American spelling, "don't" to "do not").
    That normaliser always lowercases and removes punctuation itself, keeping the
    symbols that form numbers ("25.5%", "$20"); so with ``english`` the other two
    steps are its own, and turning either off is refused rather than ignored.

    >>> TextNormalization()("Hello,  World! Don't.")
    "hello world don't"
    >>> TextNormalization(lowercase=False)("Hello,  World!")
    'Hello World'
    """

    lowercase: bool = True
    strip_punctuation: bool = True
    english: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool):
                raise EvaluationError(f"normalization key {f.name!r} must be true or false, got {value!r}")
        if self.english and not (self.lowercase and self.strip_punctuation):
            off = [k for k in ("lowercase", "strip_punctuation") if not getattr(self, k)]
            raise EvaluationError(
                f"normalization key 'english' always lowercases and strips punctuation; it cannot be combined with "
                f"{' and '.join(f'{k}: false' for k in off)}"
            )
        if self.english:
            _english_normalizer()  # a missing package fails when the config is read, not mid-evaluation

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any] | None) -> TextNormalization:
        """Build from a config dict; unknown keys are an error naming them.

        >>> TextNormalization.from_mapping({"lowercase": False})
        TextNormalization(lowercase=False, strip_punctuation=True, english=False)
        """
        config = dict(config or {})
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            known = ", ".join(f.name for f in fields(cls))
            raise EvaluationError(f"unknown normalization key(s) {', '.join(map(repr, unknown))}; known: {known}")
        return cls(**config)

    def __call__(self, text: str) -> str:
        if self.english:
            # Whisper's normaliser lowercases and strips punctuation itself.
            return collapse_whitespace(_english_normalizer()(text))
        if self.lowercase:
            text = text.lower()
        if self.strip_punctuation:
            text = strip_punctuation(text)
        return collapse_whitespace(text)
