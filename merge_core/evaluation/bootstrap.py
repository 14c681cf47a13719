"""Paired bootstrap confidence intervals of WERs, their differences and forgetting.

Bisani and Ney, "Bootstrap Estimates for Confidence Intervals in ASR Performance
Evaluation": a test set's utterances are resampled with replacement, and the WER of a
resample ``b`` of set ``s`` (``n`` scored utterances, indices ``i_b1 .. i_bn`` drawn
uniformly) is its errors over its words, pooled as the point estimate is::

    WER_b(s) = sum_j e(i_bj) / sum_j w(i_bj)

The interval at confidence ``c`` is the percentile interval of the ``B`` resampled
values, ``[q_{(1-c)/2}, q_{(1+c)/2}]``. Sets are resampled each on its own (stratified),
and every model is scored on the same resamples, so a difference between two models is
*paired*: ``Delta_b = WER_b(A) - WER_b(R)`` on the same utterances, whose interval
excludes the utterance-sampling noise the two share (a model against itself gives
exactly ``[0, 0]``). Forgetting % of a resample is the relative increase of the pooled
WER over the forgetting sets (:func:`merge_core.evaluation.report.forgetting_pct`),
both models on the same resampled utterances.

Utterances skipped as empty (no reference words) are not resampled. The index
matrices (``B x n``, one per set, drawn in the report's column order from
``numpy.random.default_rng(seed)``) are turned into draw counts once and reused for
every model: a model's ``B`` resampled error totals are one matrix product.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

from merge_core.errors import EvaluationError

Interval = list[float]  # [lo, hi]


@dataclass(frozen=True)
class BootstrapSettings:
    """How intervals are estimated: ``resamples`` (B), ``confidence``, ``seed``.

    >>> BootstrapSettings.from_mapping({"seed": 3}).as_dict()
    {'resamples': 1000, 'confidence': 0.95, 'seed': 3}
    """

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        for name, least in (("resamples", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise EvaluationError(f"bootstrap key {name!r} must be an integer >= {least}, got {value!r}")
        value = self.confidence
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise EvaluationError(f"bootstrap key 'confidence' must be a number between 0 and 1, got {value!r}")

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any] | None) -> BootstrapSettings:
        """Build from a config dict; unknown keys are an error naming them."""
        config = dict(config or {})
        unknown = sorted(map(str, set(config) - {f.name for f in fields(cls)}))
        if unknown:
            known = ", ".join(f.name for f in fields(cls))
            raise EvaluationError(f"unknown bootstrap key(s) {', '.join(map(repr, unknown))}; known: {known}")
        return cls(**config)

    def as_dict(self) -> dict[str, Any]:
        """The settings, for JSON."""
        return asdict(self)


def draw_counts(sizes: Mapping[str, int], settings: BootstrapSettings) -> dict[str, np.ndarray]:
    """How often each utterance of each set is drawn in each resample: ``B x n`` per set.

    One generator, ``default_rng(seed)``, draws a ``B x n`` matrix of indices per set in
    the order of ``sizes``; row ``b`` of the result counts the draws of each index in
    resample ``b`` (so ``counts @ values`` is each resample's total of ``values``).

    >>> counts = draw_counts({"a": 3}, BootstrapSettings(resamples=4))
    >>> counts["a"].shape, counts["a"].sum(axis=1).tolist()
    ((4, 3), [3.0, 3.0, 3.0, 3.0])
    """
    rng = np.random.default_rng(settings.seed)
    b = settings.resamples
    counts = {}
    for name, n in sizes.items():
        indices = rng.integers(0, n, size=(b, n))
        # one bincount over all rows at once: row r's indices are offset by r * n
        flat = (indices + n * np.arange(b)[:, None]).ravel()
        counts[name] = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
    return counts


def percentile_intervals(values: np.ndarray, confidence: float) -> list[Interval]:
    """``[q_{(1-c)/2}, q_{(1+c)/2}]`` of each row of ``values`` (``k x B``: k quantities,
    B resamples each), numpy's linear interpolation; one call for all rows.

    >>> percentile_intervals(np.stack([np.arange(101.0), np.zeros(101)]), 0.5)
    [[25.0, 75.0], [0.0, 0.0]]
    """
    lo, hi = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2], axis=-1)
    return [[float(a), float(b)] for a, b in zip(np.atleast_1d(lo), np.atleast_1d(hi))]


class PairedBootstrap:
    """Every model's resampled error totals on the same resamples of every set.

    Parameters
    ----------
    words : mapping of set -> sequence of int
        Reference words of each utterance, in manifest order; 0 marks an utterance
        skipped as empty, which is left out of the resampling.
    errors : mapping of model -> set -> sequence of int
        Errors (substitutions + deletions + insertions) of each utterance, aligned with ``words``.
    settings : BootstrapSettings
        Resamples, confidence and seed.
    """

    def __init__(
        self,
        words: Mapping[str, Sequence[int]],
        errors: Mapping[str, Mapping[str, Sequence[int]]],
        settings: BootstrapSettings,
    ) -> None:
        self.settings = settings
        scored = {s: np.asarray(w) > 0 for s, w in words.items()}
        counts = draw_counts({s: int(kept.sum()) for s, kept in scored.items()}, settings)
        self.words = {s: counts[s] @ np.asarray(words[s], dtype=np.float64)[scored[s]] for s in words}
        models = list(errors)
        self.errors: dict[str, dict[str, np.ndarray]] = {m: {} for m in models}
        for s, kept in scored.items():
            per_model = np.stack([np.asarray(errors[m][s], dtype=np.float64)[kept] for m in models], axis=1)
            totals = counts[s] @ per_model  # B x models: exact, integer sums far below 2**53
            for j, m in enumerate(models):
                self.errors[m][s] = totals[:, j]

    def wer(self, model: str, test_set: str) -> np.ndarray:
        """The ``B`` resampled WERs (%) of ``model`` on ``test_set``."""
        return 100.0 * self.errors[model][test_set] / self.words[test_set]

    def pooled_wer(self, model: str, sets: Sequence[str]) -> np.ndarray:
        """Errors over words summed over ``sets``, per resample (%)."""
        return 100.0 * sum(self.errors[model][s] for s in sets) / sum(self.words[s] for s in sets)

    def mean_wer(self, model: str, sets: Sequence[str]) -> np.ndarray:
        """The mean of the per-set WERs over ``sets``, per resample (the report's Average)."""
        return sum(self.wer(model, s) for s in sets) / len(sets)

    def forgetting(self, model: str, reference: str, sets: Sequence[str]) -> np.ndarray | None:
        """Forgetting % of ``model`` against ``reference`` on the pooled ``sets``, per
        resample; None when some resample leaves the reference with no error (a relative
        increase over 0 is undefined)."""
        ref = self.pooled_wer(reference, sets)
        if not np.all(ref > 0):
            return None
        return 100.0 * (self.pooled_wer(model, sets) - ref) / ref

    def intervals(self, values: Mapping[str, np.ndarray | None]) -> dict[str, Interval | None]:
        """The percentile interval of each named array of resampled values (None stays None)."""
        named = [k for k, v in values.items() if v is not None]
        found = percentile_intervals(np.stack([values[k] for k in named]), self.settings.confidence) if named else []
        return {**dict.fromkeys(values), **dict(zip(named, found))}

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> PairedBootstrap | None:
        """The bootstrap a report's intervals came from (same per-utterance counts, same
        settings, same resamples); None when the report has no per-utterance counts."""
        words = report.get("utterance_words")
        if words is None:
            return None
        errors = {
            m["name"]: {
                s: np.sum([counts[k] for k in ("substitutions", "deletions", "insertions")], axis=0)
                for s, counts in m["per_utterance"].items()
            }
            for m in report["models"]
        }
        ordered = {s: words[s] for s in report["sets"]}
        return cls(ordered, errors, BootstrapSettings.from_mapping(report["bootstrap"]))
