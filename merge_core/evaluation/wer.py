"""Word error rate counts that pool correctly across utterances and test sets.

A set's WER is total errors over total reference words, never a mean of
per-utterance or per-set rates: :class:`WerStats` keeps the counts, and ``+`` sums
them, so pooling ``test_clean`` and ``test_other`` weighs each by its word count.
:func:`score_utterances` keeps one :class:`WerStats` per utterance, in manifest order, for
per-utterance transcripts and the bootstrap (:mod:`merge_core.evaluation.bootstrap`);
:func:`score` is their sum.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import jiwer

from merge_core.errors import EvaluationError
from merge_core.evaluation.text import TextNormalization

_SHOWN_INDICES = 5


@dataclass(frozen=True)
class WerStats:
    """Edit counts of hypotheses against references, summed over utterances.

    ``words`` is the number of reference words (hits + substitutions + deletions),
    ``utterances`` the number scored, ``skipped_empty`` the number left out because
    their reference was empty after normalisation.

    >>> s = WerStats(substitutions=1, deletions=1, insertions=0, words=4, utterances=1)
    >>> s.errors, s.hits, s.wer
    (2, 2, 0.5)
    >>> (s + WerStats(insertions=2, words=6, utterances=1)).wer  # 4 errors / 10 words
    0.4
    """

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    words: int = 0
    utterances: int = 0
    skipped_empty: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EvaluationError(f"WerStats.{f.name} must be a non-negative integer, got {value!r}")
        if self.substitutions + self.deletions > self.words:
            raise EvaluationError(
                f"WerStats: substitutions + deletions ({self.substitutions + self.deletions}) "
                f"exceed the reference word count ({self.words})"
            )

    @property
    def errors(self) -> int:
        """Substitutions + deletions + insertions."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def hits(self) -> int:
        """Reference words recognised correctly."""
        return self.words - self.substitutions - self.deletions

    @property
    def wer(self) -> float:
        """errors / words as a fraction (not a percentage); NaN when there are no
        reference words, since a rate over nothing is undefined."""
        return self.errors / self.words if self.words else math.nan

    def __add__(self, other: WerStats) -> WerStats:
        if not isinstance(other, WerStats):
            return NotImplemented
        return WerStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __radd__(self, other: Any) -> WerStats:
        # Lets the built-in sum() start from its default 0.
        if other == 0:
            return self
        return NotImplemented

    @classmethod
    def total(cls, items: Iterable[WerStats]) -> WerStats:
        """The counts of ``items`` summed, as ``sum(items, WerStats())`` but in one step
        (a set's per-utterance counts run to thousands).

        >>> WerStats.total([WerStats(deletions=1, words=2, utterances=1), WerStats(skipped_empty=1)]).as_dict()
        {'substitutions': 0, 'deletions': 1, 'insertions': 0, 'words': 2, 'utterances': 1, 'skipped_empty': 1}
        """
        items = list(items)
        return cls(**{f.name: sum(getattr(s, f.name) for s in items) for f in fields(cls)})

    def as_dict(self) -> dict[str, int]:
        """The counts, for JSON."""
        return asdict(self)

    @classmethod
    def from_mapping(cls, counts: Mapping[str, Any]) -> WerStats:
        """Inverse of :meth:`as_dict`; extra keys (a stored ``wer``) are ignored."""
        missing = [f.name for f in fields(cls) if f.name not in counts]
        if missing:
            raise EvaluationError(f"WER counts lack key(s) {', '.join(map(repr, missing))}")
        return cls(**{f.name: counts[f.name] for f in fields(cls)})


def _check_texts(kind: str, texts: Sequence[str], where: str) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise EvaluationError(f"{where}{kind} {i} is {type(text).__name__}, not a string")


def _edit_counts(chunks: Sequence[Any]) -> WerStats:
    """One utterance's counts from its jiwer alignment: equal, substituted and deleted
    chunks span reference words, inserted chunks hypothesis words."""
    spans = {"equal": 0, "substitute": 0, "delete": 0, "insert": 0}
    for chunk in chunks:
        if chunk.type == "insert":
            spans["insert"] += chunk.hyp_end_idx - chunk.hyp_start_idx
        else:
            spans[chunk.type] += chunk.ref_end_idx - chunk.ref_start_idx
    return WerStats(
        substitutions=spans["substitute"],
        deletions=spans["delete"],
        insertions=spans["insert"],
        words=spans["equal"] + spans["substitute"] + spans["delete"],
        utterances=1,
    )


def _scored(
    references: Sequence[str],
    hypotheses: Sequence[str],
    normalization: TextNormalization | Mapping[str, Any] | None,
    where: str,
) -> list[WerStats]:
    if len(references) != len(hypotheses):
        raise EvaluationError(f"{where}{len(references)} references but {len(hypotheses)} hypotheses")
    _check_texts("reference", references, where)
    _check_texts("hypothesis", hypotheses, where)
    if not isinstance(normalization, TextNormalization):
        normalization = TextNormalization.from_mapping(normalization)
    refs = [normalization(ref) for ref in references]
    kept = [i for i, ref in enumerate(refs) if ref]
    per_utterance = [WerStats(skipped_empty=1)] * len(refs)
    if kept:
        aligned = jiwer.process_words([refs[i] for i in kept], [normalization(hypotheses[i]) for i in kept])
        for i, chunks in zip(kept, aligned.alignments):
            per_utterance[i] = _edit_counts(chunks)
    return per_utterance


def _warn_skipped(per_utterance: Sequence[WerStats], where: str) -> None:
    skipped = [i for i, u in enumerate(per_utterance) if u.skipped_empty]
    if skipped:
        shown = ", ".join(map(str, skipped[:_SHOWN_INDICES])) + (", ..." if len(skipped) > _SHOWN_INDICES else "")
        warnings.warn(
            f"{where}skipped {len(skipped)} utterance(s) whose reference is empty after normalisation "
            f"(index {shown})",
            stacklevel=3,  # the line that called score() or score_utterances()
        )


def score_utterances(
    references: Sequence[str],
    hypotheses: Sequence[str],
    normalization: TextNormalization | Mapping[str, Any] | None = None,
    name: str | None = None,
) -> list[WerStats]:
    """The edit counts of each pair, one :class:`WerStats` per utterance, in input order.

    Both sides are normalised first (default :class:`TextNormalization`, or one
    built from a config mapping). A pair whose normalised reference is empty is
    skipped with a warning and marked ``WerStats(skipped_empty=1)`` (no words, no
    errors): it has no words to divide by, and counting its insertions would charge
    the model for a test-set defect. Every other pair has ``utterances=1``. ``name``
    (a test-set name) prefixes error and warning messages.

    >>> [u.errors for u in score_utterances(["the cat sat", "on the mat"], ["the cat sat down", "on mat"])]
    [1, 1]
    """
    where = f"{name}: " if name else ""
    per_utterance = _scored(references, hypotheses, normalization, where)
    _warn_skipped(per_utterance, where)
    return per_utterance


def score(
    references: Sequence[str],
    hypotheses: Sequence[str],
    normalization: TextNormalization | Mapping[str, Any] | None = None,
    name: str | None = None,
) -> WerStats:
    """Pooled edit counts of ``hypotheses`` against ``references``: the sum of their
    :func:`score_utterances` (which says how empty references are skipped).

    >>> score(["the cat sat", "on the mat"], ["the cat sat down", "on mat"]).errors
    2
    """
    where = f"{name}: " if name else ""
    per_utterance = _scored(references, hypotheses, normalization, where)
    _warn_skipped(per_utterance, where)
    return WerStats.total(per_utterance)
