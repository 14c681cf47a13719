"""Sentences to speak: English prose from Debian's ``fortunes`` and JL Corpus-like phrases.

Transcripts follow LibriSpeech: upper-case words of letters and inner apostrophes,
one space apart, no punctuation. What espeak-ng reads (the "spoken" form) keeps the
sentence's punctuation for natural pauses but says exactly the transcript's words:
anything espeak-ng would expand differently (digits, abbreviations, acronyms,
symbols) makes the sentence rejected rather than guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from merge_core.errors import CorpusError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_HINT = "apt-get install fortunes"
MIN_WORDS, MAX_WORDS = 4, 14

# Latin, and stereotype humour that has no place in a demo corpus.
EXCLUDED_FORTUNE_FILES = frozenset({"translate-me", "ethnic", "men-women"})
# Spoken differently from how they are written ("Mr" is read "mister").
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "ie", "eg", "co", "inc", "ltd"})

_ATTRIBUTION = re.compile(r"^\s*--")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')]*\s+")
_ALLOWED = re.compile(r"[A-Za-z ,.;:!?'\"-]+")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


@dataclass(frozen=True)
class Sentence:
    """A transcript (LibriSpeech style) and the text espeak-ng reads to say it."""

    text: str
    spoken: str


def transcript_words(sentence: str) -> list[str]:
    """The LibriSpeech-style words of ``sentence``: letters and inner apostrophes, upper case.

    >>> transcript_words("'Don't,' she said -- well-known.")
    ["DON'T", 'SHE', 'SAID', 'WELL', 'KNOWN']
    """
    return [w.upper() for w in _WORD.findall(sentence)]


def speakable(sentence: str) -> Sentence | None:
    """``sentence`` as a :class:`Sentence`, or None when espeak-ng would not say exactly its words.

    >>> speakable("Never put off till tomorrow what you can do today.")
    Sentence(text='NEVER PUT OFF TILL TOMORROW WHAT YOU CAN DO TODAY', spoken='Never put off till tomorrow what you can do today.')
    >>> speakable("Call Dr Smith at 9."), speakable("The IBM PC was fine."), speakable("Too short.")
    (None, None, None)
    """
    sentence = " ".join(sentence.split())
    if not _ALLOWED.fullmatch(sentence):
        return None
    words = _WORD.findall(sentence)
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    if any(len(w) > 1 and w.isupper() for w in words) or any(w.lower() in ABBREVIATIONS for w in words):
        return None
    return Sentence(text=" ".join(transcript_words(sentence)), spoken=sentence)


def cookie_sentences(cookie: str) -> list[str]:
    """The sentences of one fortune cookie, its attribution lines dropped.

    >>> cookie_sentences("Time flies.  Fruit flies\\nlike a banana.\\n\\t\\t-- Groucho")
    ['Time flies.', 'Fruit flies like a banana.']
    """
    lines = [line for line in cookie.splitlines() if not _ATTRIBUTION.match(line)]
    text = " ".join(" ".join(lines).split())
    return [s for s in _SENTENCE_END.split(text) if s]


def fortune_files(folder: Path = FORTUNES_DIR) -> list[Path]:
    """The fortune text files in ``folder`` (not their ``.dat`` indexes or ``.u8`` links), sorted."""
    if not folder.is_dir():
        raise CorpusError(f"{folder}: no fortunes folder (on Debian/Ubuntu: {FORTUNES_HINT})")
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.is_symlink()
        and p.suffix not in {".dat", ".u8"}
        and p.name not in EXCLUDED_FORTUNE_FILES
    )


def fortune_sentences(folder: Path = FORTUNES_DIR) -> list[Sentence]:
    """Every distinct speakable sentence of the fortunes in ``folder``, in file order.

    Distinct by transcript, so two spellings of one sentence never land in different splits.
    """
    found: dict[str, Sentence] = {}
    for path in fortune_files(folder):
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            for raw in cookie_sentences(cookie):
                sentence = speakable(raw)
                if sentence is not None:
                    found.setdefault(sentence.text, sentence)
    if not found:
        raise CorpusError(f"{folder}: no speakable English sentences found (on Debian/Ubuntu: {FORTUNES_HINT})")
    return list(found.values())


# A JL Corpus-like pool: few short phrases, each read in every emotion, so that a
# model can memorise them (the paper's explanation of JL Corpus's very low WER).
PHRASES = tuple(
    Sentence(text=p.upper(), spoken=p)
    for p in (
        "the train leaves at half past seven",
        "please bring the blue folder to my desk",
        "i never said she took the money",
        "we are going to the beach tomorrow",
        "open the window before the storm arrives",
        "my brother painted the fence again",
        "the package arrived early this morning",
        "turn left at the old church",
        "nobody told me about the meeting",
        "she sold the house last summer",
        "the dog ran across the wet grass",
        "you forgot to lock the front door",
        "they finally fixed the kitchen sink",
        "the coffee is far too hot",
        "i will call you after dinner",
        "the children watched the fireworks",
        "he lost his keys at the market",
        "our flight has been delayed again",
        "the garden looks lovely in spring",
        "put the books back on the shelf",
    )
)
