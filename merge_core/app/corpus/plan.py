"""Every utterance of a synthetic corpus, decided before any audio is made.

A plan is a pure function of (size, seed, text source): the same arguments give the
same utterances in the same order, and each utterance carries everything needed to
render it on its own, in any process, in any order.

Guarantees, per domain: speakers are disjoint across splits; sentences are disjoint
across splits, except in the ``phrases`` domain (JL Corpus repeats its phrases on
purpose); and no dev or test sentence of any domain is in any training split. Training
splits draw from the sentences left over and cycle through them again only when a
split needs more utterances than there are sentences (the large size).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar

from merge_core.app.corpus.domains import DOMAINS, SIZES, Condition, Domain, Sizes, SplitDesign
from merge_core.errors import CorpusError
from merge_core.app.corpus.finance import finance_sentences
from merge_core.app.corpus.text import PHRASES, Sentence
from merge_core.app.corpus.voices import Speaker, VoicePool, make_speaker, voice_order

# LibriSpeech's chapters hold tens of utterances; IDs stay unique while a speaker has
# fewer than 10 chapters and a domain fewer than 1000 speakers.
CHAPTER_SIZE = 50
MAX_CHAPTERS = 10
SPEAKERS_PER_DOMAIN = 1000

T = TypeVar("T")
# (domain, split) -> the sentences its utterances say, in order
Texts = dict[tuple[str, str], list[Sentence]]


@dataclass(frozen=True)
class PlannedUtterance:
    """One utterance: where it goes, what is said, by whom and how."""

    domain: str
    split: str
    id: str  # <speaker>-<chapter>-<index>, as LibriSpeech
    text: str
    spoken: str
    voice: str
    speed: int
    pitch: int
    style: str
    effects: tuple[dict[str, Any], ...]

    @property
    def speaker(self) -> int:
        """The speaker ID, the first field of the utterance ID."""
        return int(self.id.split("-")[0])

    @property
    def chapter(self) -> int:
        """The chapter ID, the second field of the utterance ID."""
        return int(self.id.split("-")[1])

    @property
    def path(self) -> PurePosixPath:
        """The audio file, relative to the corpus folder."""
        return PurePosixPath(self.domain, self.split, str(self.speaker), str(self.chapter), f"{self.id}.flac")

    def record(self) -> dict[str, Any]:
        """A JSON-able description (``utterances.jsonl``'s lines)."""
        return {**asdict(self), "effects": list(self.effects), "path": str(self.path)}


def stream(seed: int, *names: str) -> random.Random:
    """An independent random stream for one purpose; string seeds hash the same on every run.

    >>> stream(0, "a").random() == stream(0, "a").random() != stream(1, "a").random()
    True
    """
    return random.Random(":".join([str(seed), *names]))


def utterance_seed(seed: int, utterance_id: str) -> int:
    """The seed of one utterance's random effects (its noise), independent of render order."""
    digest = hashlib.sha256(f"{seed}:{utterance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def balanced(options: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """``count`` items that use every option equally often (up to one), shuffled.

    >>> sorted(balanced("ab", 4, random.Random(0)))
    ['a', 'a', 'b', 'b']
    """
    items = [options[i % len(options)] for i in range(count)]
    rng.shuffle(items)
    return items


def fortune_texts(domains: Sequence[Domain], sizes: Sizes, pool: Sequence[Sentence], seed: int) -> Texts:
    """Sentences for every split of ``domains`` from one shared ``pool``: each evaluation
    split gets sentences of its own, training splits cycle through what is left."""
    evaluation = [(d.name, s.name) for d in domains for s in d.splits if s.evaluation]
    needed = sum(sizes[domain][split].utterances for domain, split in evaluation)
    if needed >= len(pool):
        raise CorpusError(
            f"the text source has {len(pool)} sentences, too few to keep {needed} for dev and test "
            "(install Debian's full 'fortunes' package, not only 'fortunes-min')"
        )
    order = list(pool)
    stream(seed, "fortunes").shuffle(order)
    texts: Texts = {}
    for key in evaluation:
        count = sizes[key[0]][key[1]].utterances
        texts[key], order = order[:count], order[count:]
    for d in domains:
        for s in d.splits:
            if not s.evaluation:
                texts[d.name, s.name] = cycled(
                    order, sizes[d.name][s.name].utterances, stream(seed, d.name, s.name, "text")
                )
    return texts


def cycled(pool: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """``count`` items from ``pool``: a shuffled pass through it, another when it runs out."""
    items: list[T] = []
    while len(items) < count:
        batch = list(pool)
        rng.shuffle(batch)
        items.extend(batch[: count - len(items)])
    return items


def finance_texts(domain: Domain, sizes: Sizes, seed: int) -> Texts:
    """Distinct generated sentences, cut into the splits in order."""
    counts = [sizes[domain.name][s.name].utterances for s in domain.splits]
    sentences = finance_sentences(sum(counts), stream(seed, domain.name, "text"))
    texts: Texts = {}
    start = 0
    for split, count in zip(domain.splits, counts):
        texts[domain.name, split.name] = sentences[start : start + count]
        start += count
    return texts


def phrase_texts(domain: Domain, sizes: Sizes, seed: int) -> Texts:
    """The same few phrases in every split, each equally often."""
    return {
        (domain.name, s.name): balanced(
            PHRASES, sizes[domain.name][s.name].utterances, stream(seed, domain.name, s.name, "text")
        )
        for s in domain.splits
    }


def split_speakers(domain: Domain, index: int, sizes: Sizes, seed: int) -> dict[str, list[Speaker]]:
    """Each split's speakers: distinct voices, never shared between splits of the domain.
    Speaker IDs start at ``(index + 1) * 1000``, so they are unique across domains too."""
    orders: dict[VoicePool, list[str]] = {}
    speakers: dict[str, list[Speaker]] = {}
    next_id = (index + 1) * SPEAKERS_PER_DOMAIN
    for split in domain.splits:
        size = sizes[domain.name][split.name]
        order = orders.setdefault(split.voices, voice_order(split.voices, stream(seed, domain.name, "voices")))
        if size.speakers > len(order) or size.speakers > size.utterances:
            raise CorpusError(
                f"{domain.name}/{split.name}: {size.speakers} speakers asked for {size.utterances} utterances "
                f"and {len(order)} voices left"
            )
        rng = stream(seed, domain.name, split.name, "speakers")
        speakers[split.name] = [
            make_speaker(next_id + k, order.pop(0), split.voices, rng) for k in range(size.speakers)
        ]
        next_id += size.speakers
    return speakers


def utterance_ids(speakers: Sequence[Speaker], count: int) -> list[tuple[Speaker, str]]:
    """(speaker, LibriSpeech ID) for ``count`` utterances spread evenly over ``speakers``, in chapters.

    >>> two = [Speaker(1001, "en-us", 160, 50), Speaker(1002, "en-gb", 160, 50)]
    >>> [utterance_id for _, utterance_id in utterance_ids(two, 3)]
    ['1001-10010-0000', '1001-10010-0001', '1002-10020-0000']
    """
    ids = []
    for k, speaker in enumerate(speakers):
        share = count // len(speakers) + (k < count % len(speakers))
        if share > CHAPTER_SIZE * MAX_CHAPTERS:
            raise CorpusError(f"speaker {speaker.id}: {share} utterances exceed {CHAPTER_SIZE * MAX_CHAPTERS}")
        for i in range(share):
            chapter = speaker.id * MAX_CHAPTERS + i // CHAPTER_SIZE
            ids.append((speaker, f"{speaker.id}-{chapter}-{i % CHAPTER_SIZE:04d}"))
    return ids


def plan_split(
    domain: Domain, split: SplitDesign, speakers: list[Speaker], texts: list[Sentence], seed: int
) -> list[PlannedUtterance]:
    """The utterances of one split."""
    conditions: list[Condition] = balanced(
        split.conditions, len(texts), stream(seed, domain.name, split.name, "conditions")
    )
    planned = []
    for (speaker, utterance_id), sentence, condition in zip(utterance_ids(speakers, len(texts)), texts, conditions):
        planned.append(
            PlannedUtterance(
                domain=domain.name,
                split=split.name,
                id=utterance_id,
                text=sentence.text,
                spoken=sentence.spoken,
                voice=speaker.voice,
                speed=round(speaker.speed * condition.style.speed),
                pitch=min(99, max(0, speaker.pitch + condition.style.pitch)),
                style=condition.style.name,
                effects=condition.effects,
            )
        )
    return planned


def plan_corpus(size: str, seed: int, fortunes: Sequence[Sentence]) -> list[PlannedUtterance]:
    """Every utterance of the corpus of ``size`` (see :data:`SIZES`) and ``seed``, domain by
    domain and split by split; ``fortunes`` is the prose pool (``text.fortune_sentences()``)."""
    if size not in SIZES:
        raise CorpusError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    sizes = SIZES[size]
    texts = fortune_texts([d for d in DOMAINS if d.text == "fortunes"], sizes, fortunes, seed)
    for domain in DOMAINS:
        if domain.text == "finance":
            texts.update(finance_texts(domain, sizes, seed))
        elif domain.text == "phrases":
            texts.update(phrase_texts(domain, sizes, seed))
    planned = []
    for index, domain in enumerate(DOMAINS):
        speakers = split_speakers(domain, index, sizes, seed)
        for split in domain.splits:
            planned.extend(plan_split(domain, split, speakers[split.name], texts[domain.name, split.name], seed))
    return planned
