"""Forgetting report: per-set WER of every model, their average, and how much each
model forgot relative to the reference model (the generalist).

Definitions (as in the paper's Table VII):

- **WER** of a set: its errors over its reference words, as a percentage.
- **Average**: the mean of a model's per-set WERs over all reported sets (each set
  weighs the same, however many words it has).
- **Pooled reference WER**: errors summed over the *forgetting sets* (default
  ``test_clean`` + ``test_other``) over their words summed.
- **% Forgetting**: ``100 * (pooled - reference pooled) / reference pooled``, the
  relative increase of a model's pooled reference WER over the reference model's.
  Negative when the model improved. ``None`` (``null`` in JSON, "n/a" in the table)
  when the reference model's pooled WER is 0: a relative increase over 0 is undefined.

Every number comes with a bootstrap interval when the results hold per-utterance counts
(:mod:`merge_core.evaluation.bootstrap`): utterances of each set resampled with
replacement, every model on the same resamples, so a row's difference to the reference
and its Forgetting % are *paired*. A model against itself gets exactly ``[0, 0]``.

``report.json`` schema (all WERs and differences are percentages or percentage points,
unrounded; an interval is ``[lo, hi]``, or ``null`` where it cannot be computed: results
given as pooled counts, or a Forgetting % that is itself null)::

    {
      "reference_model": "generalist",
      "forgetting_sets": ["test_clean", "test_other"],
      "sets": ["noise", "phone", "test_clean", "test_other"],   # column order
      "bootstrap": {"resamples": 1000, "confidence": 0.95, "seed": 0},
      "normalization": {"lowercase": true, "strip_punctuation": true,
                        "english": false},                      # or null: not stated
      "note": "smoke-size run: ...",                            # or null
      "utterance_words": {"noise": [12, 0, 7, ...], ...},       # or null; per utterance,
                                                                # manifest order; 0: skipped
      "models": [                                               # row order
        {
          "name": "generalist",
          "checkpoint": "generalist.nemo",                      # as configured, or null
          "weights_digest": "9f86d0...",                        # the cache's, or null
          "wer": {"noise": 12.3, ...},                           # every set
          "wer_ci": {"noise": [10.9, 13.8], ...},               # each [lo, hi] or null
          "stats": {"noise": {"substitutions": int, "deletions": int,
                              "insertions": int, "words": int,
                              "utterances": int, "skipped_empty": int,
                              "wer": 12.3}, ...},
          "average_wer": 8.1,
          "average_wer_ci": [7.4, 8.9],                          # or null
          "pooled_reference_wer": 4.2,
          "forgetting_pct": 0.0,                                 # or null
          "forgetting_ci": [0.0, 0.0],                           # or null
          "delta": {                                             # this row - the reference's
            "wer": {"noise": 0.0, ...},                          # paired, same resamples
            "wer_ci": {"noise": [0.0, 0.0], ...},                # each [lo, hi] or null
            "average_wer": 0.0,
            "average_wer_ci": [0.0, 0.0]                         # or null
          },
          "transcripts": {"noise": "transcripts/generalist/noise.json", ...},
                                                                 # from the report's folder, or null
          "per_utterance": {"noise": {"substitutions": [...], "deletions": [...],
                                      "insertions": [...]}, ...} # or null; as utterance_words
        },
        ...
      ]
    }

``per_utterance`` and ``utterance_words`` are what the intervals are computed from
(:meth:`PairedBootstrap.from_report` recomputes them, and any paired difference between
two rows, with the same resamples); :func:`results_from_report` rebuilds the counts.

Columns default to the non-forgetting (domain) sets in the order they first
appear in the results, then the forgetting sets in the given order; rows follow
the results' order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from merge_core.atomic import write_atomically
from merge_core.errors import EvaluationError
from merge_core.evaluation.bootstrap import BootstrapSettings, PairedBootstrap
from merge_core.evaluation.text import TextNormalization
from merge_core.evaluation.wer import WerStats

DEFAULT_FORGETTING_SETS = ("test_clean", "test_other")
_FIELDS = tuple(f.name for f in fields(WerStats))
_ERRORS = _FIELDS[:3]  # substitutions, deletions, insertions
_WORDS = _FIELDS.index("words")

# model -> set -> WerStats (or its as_dict()), or a list of one WerStats per utterance (score_utterances)
Results = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class ModelSource:
    """Where a row's numbers come from: its checkpoint as configured, the digest of its
    weights, and its transcripts (set -> path relative to the report's folder)."""

    checkpoint: str | None = None
    weights_digest: str | None = None
    transcripts: Mapping[str, str] | None = None


def forgetting_pct(model_pooled: float, reference_pooled: float) -> float | None:
    """Relative increase of a pooled WER over the reference's, in percent.

    None when ``reference_pooled`` is 0: the increase relative to 0 is undefined
    (and a model matching a perfect reference did not forget, while any error would
    be "infinitely" worse), so the report shows "n/a" rather than a made-up number.

    >>> forgetting_pct(12.0, 10.0)
    20.0
    >>> forgetting_pct(9.0, 10.0)
    -10.0
    >>> forgetting_pct(1.0, 0.0) is None
    True
    """
    if reference_pooled == 0:
        return None
    return 100.0 * (model_pooled - reference_pooled) / reference_pooled


def pooled_stats(stats: Mapping[str, WerStats], sets: Sequence[str]) -> WerStats:
    """Counts summed over ``sets``: the pooled WER weighs each set by its words.

    >>> a = WerStats(substitutions=1, words=10, utterances=1)
    >>> b = WerStats(substitutions=9, words=30, utterances=1)
    >>> pooled_stats({"a": a, "b": b}, ["a", "b"]).wer  # 10/40, not mean(0.1, 0.3)
    0.25
    """
    return sum((stats[s] for s in sets), WerStats())


def average_wer(wers: Mapping[str, float]) -> float:
    """Mean of per-set WERs, each set weighing the same (Table VII's "Average").

    >>> average_wer({"a": 10.0, "b": 30.0})
    20.0
    """
    if not wers:
        raise EvaluationError("average WER of no test sets")
    return sum(wers.values()) / len(wers)


def _counts(value: Any, where: str) -> WerStats:
    if isinstance(value, WerStats):
        return value
    if isinstance(value, Mapping):
        try:
            return WerStats.from_mapping(value)
        except EvaluationError as e:
            raise EvaluationError(f"{where}: {e}") from None
    raise EvaluationError(f"{where}: expected WerStats, got {type(value).__name__}")


def _utterances(value: Any, model: str, set_name: str) -> np.ndarray | None:
    """Per-utterance counts given as a list, as an ``n x 6`` array of :class:`WerStats`'
    fields (None for pooled counts). Each must be one utterance: scored (``utterances=1``
    with words) or skipped as empty (``WerStats(skipped_empty=1)``)."""
    if not isinstance(value, (list, tuple)):
        return None
    where = f"model {model!r}, set {set_name!r}"
    items = [_counts(item, f"{where}, utterance {i}") for i, item in enumerate(value)]
    counts = np.array([[getattr(u, f) for f in _FIELDS] for u in items], dtype=np.int64).reshape(-1, len(_FIELDS))
    column = dict(zip(_FIELDS, counts.T))
    scored = (column["utterances"] == 1) & (column["words"] > 0) & (column["skipped_empty"] == 0)
    skipped = (column["skipped_empty"] == 1) & (counts.sum(axis=1) == 1)
    wrong = np.flatnonzero(~(scored | skipped))
    if wrong.size:
        raise EvaluationError(f"{where}, utterance {wrong[0]}: not the counts of one utterance ({items[wrong[0]]})")
    return counts


def _as_stats(value: Any, model: str, set_name: str) -> WerStats:
    where = f"model {model!r}, set {set_name!r}"
    stats = _counts(value, where)
    if stats.words == 0:
        raise EvaluationError(
            f"{where}: no reference words ({stats.skipped_empty} utterance(s) skipped as empty), so no WER"
        )
    return stats


def _ordered_sets(results: Results, forgetting_sets: Sequence[str], sets: Sequence[str] | None) -> list[str]:
    seen = list(dict.fromkeys(s for per_set in results.values() for s in per_set))
    for f in forgetting_sets:
        if f not in seen:
            raise EvaluationError(
                f"forgetting set {f!r} is absent from the results (sets found: {', '.join(seen) or 'none'})"
            )
    if sets is None:
        return [s for s in seen if s not in forgetting_sets] + list(forgetting_sets)
    sets = list(sets)
    if len(set(sets)) != len(sets):
        raise EvaluationError(f"test sets listed twice in {sets}")
    for f in forgetting_sets:
        if f not in sets:
            raise EvaluationError(f"forgetting set {f!r} is not among the reported sets {sets}")
    return sets


def _model_stats(
    results: Results, sets: Sequence[str]
) -> tuple[dict[str, dict[str, WerStats]], dict[str, dict[str, np.ndarray]] | None]:
    """Every model's pooled counts of every set, and its per-utterance counts (``n x 6``
    arrays) where the results give them for every model and set (else None)."""
    table, utterances = {}, {}
    for model, per_set in results.items():
        missing = [s for s in sets if s not in per_set]
        if missing:
            raise EvaluationError(f"model {model!r} has no results for set(s) {', '.join(map(repr, missing))}")
        utterances[model] = {s: _utterances(per_set[s], model, s) for s in sets}
        table[model] = {
            s: _as_stats(per_set[s] if counts is None else dict(zip(_FIELDS, counts.sum(axis=0).tolist())), model, s)
            for s, counts in utterances[model].items()
        }
    complete = all(items is not None for per_set in utterances.values() for items in per_set.values())
    return table, utterances if complete else None


def _utterance_words(table: Mapping[str, Mapping[str, np.ndarray]], reference: str) -> dict[str, list[int]]:
    """Each set's reference words per utterance, the same for every model (pairing needs it)."""
    words = {s: counts[:, _WORDS] for s, counts in table[reference].items()}
    for model, per_set in table.items():
        for s, counts in per_set.items():
            if not np.array_equal(counts[:, _WORDS], words[s]):
                raise EvaluationError(
                    f"model {model!r}, set {s!r}: its utterances' reference words differ from the reference "
                    f"model {reference!r}'s; paired intervals need every model scored on the same references "
                    "with the same normalisation"
                )
    return {s: w.tolist() for s, w in words.items()}


def _pct(stats: WerStats) -> float:
    return 100.0 * stats.wer


def _intervals(boot: PairedBootstrap | None, model: str, reference: str, sets: Sequence[str],
               forgetting_sets: Sequence[str]) -> dict[str, Any]:
    """A row's intervals: its WERs, Average and Forgetting %, and its paired differences
    to the reference; all null without a bootstrap."""
    if boot is None:
        return {"wer_ci": dict.fromkeys(sets), "average_wer_ci": None, "forgetting_ci": None,
                "delta_wer_ci": dict.fromkeys(sets), "delta_average_wer_ci": None}
    wer = {s: boot.wer(model, s) for s in sets}
    average = boot.mean_wer(model, sets)
    found = boot.intervals({
        **{("wer", s): wer[s] for s in sets},
        **{("delta", s): wer[s] - boot.wer(reference, s) for s in sets},
        "average": average,
        "delta_average": average - boot.mean_wer(reference, sets),
        "forgetting": boot.forgetting(model, reference, forgetting_sets),
    })
    return {
        "wer_ci": {s: found["wer", s] for s in sets},
        "average_wer_ci": found["average"],
        "forgetting_ci": found["forgetting"],
        "delta_wer_ci": {s: found["delta", s] for s in sets},
        "delta_average_wer_ci": found["delta_average"],
    }


def _per_utterance_columns(per_set: Mapping[str, np.ndarray]) -> dict[str, dict[str, list[int]]]:
    return {s: {k: counts[:, _FIELDS.index(k)].tolist() for k in _ERRORS} for s, counts in per_set.items()}


def _normalization_mapping(normalization: TextNormalization | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if normalization is None:
        return None
    if not isinstance(normalization, TextNormalization):
        normalization = TextNormalization.from_mapping(normalization)
    return asdict(normalization)


def build_report(
    results: Results,
    reference_model: str,
    forgetting_sets: Sequence[str] = DEFAULT_FORGETTING_SETS,
    sets: Sequence[str] | None = None,
    *,
    sources: Mapping[str, ModelSource] | None = None,
    normalization: TextNormalization | Mapping[str, Any] | None = None,
    bootstrap: BootstrapSettings | Mapping[str, Any] | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """The report dict (schema in the module docstring) of ``results``.

    Parameters
    ----------
    results : mapping
        Model name -> set name -> :class:`WerStats` (or its :meth:`~WerStats.as_dict`),
        or the list of one ``WerStats`` per utterance that
        :func:`~merge_core.evaluation.wer.score_utterances` returns. Intervals need the
        lists for every model and set; with pooled counts anywhere they are null.
    reference_model : str
        The generalist: Forgetting % and every difference are relative to it.
    forgetting_sets : sequence of str
        The sets pooled for Forgetting %.
    sets : sequence of str, optional
        The column order (it must include the forgetting sets); by default, domain sets
        first, then the forgetting sets. Every model must have every reported set.
    sources : mapping of str to ModelSource, optional
        Each row's checkpoint, weights digest and transcripts (absent: null).
    normalization : TextNormalization or mapping, optional
        The normalisation the counts were scored with, recorded (None: not stated).
    bootstrap : BootstrapSettings or mapping, optional
        Resamples, confidence and seed of the intervals (default 1000, 0.95, 0).
    note : str, optional
        A warning shown with the report (e.g. that a smoke-size run's numbers are not meant to be read).
    """
    if not results:
        raise EvaluationError("no models to report")
    if reference_model not in results:
        raise EvaluationError(f"reference model {reference_model!r} is not among the models: {', '.join(results)}")
    forgetting_sets = list(forgetting_sets)
    if not forgetting_sets or len(set(forgetting_sets)) != len(forgetting_sets):
        raise EvaluationError(f"forgetting sets must be distinct and at least one, got {forgetting_sets}")
    if note is not None and not isinstance(note, str):
        raise EvaluationError(f"a report's note must be a string, got {type(note).__name__}")
    if not isinstance(bootstrap, BootstrapSettings):
        bootstrap = BootstrapSettings.from_mapping(bootstrap)
    columns = _ordered_sets(results, forgetting_sets, sets)
    table, utterances = _model_stats(results, columns)
    words = _utterance_words(utterances, reference_model) if utterances else None
    boot = None
    if utterances:
        errors = {m: {s: c[:, : len(_ERRORS)].sum(axis=1) for s, c in per.items()} for m, per in utterances.items()}
        boot = PairedBootstrap(words, errors, bootstrap)
    reference_pooled = _pct(pooled_stats(table[reference_model], forgetting_sets))
    reference_wer = {s: _pct(table[reference_model][s]) for s in columns}
    models = []
    for model, stats in table.items():
        wer = {s: _pct(stats[s]) for s in columns}
        pooled = _pct(pooled_stats(stats, forgetting_sets))
        source = (sources or {}).get(model, ModelSource())
        ci = _intervals(boot, model, reference_model, columns, forgetting_sets)
        models.append(
            {
                "name": model,
                "checkpoint": source.checkpoint,
                "weights_digest": source.weights_digest,
                "wer": wer,
                "wer_ci": ci["wer_ci"],
                "stats": {s: {**stats[s].as_dict(), "wer": wer[s]} for s in columns},
                "average_wer": average_wer(wer),
                "average_wer_ci": ci["average_wer_ci"],
                "pooled_reference_wer": pooled,
                "forgetting_pct": forgetting_pct(pooled, reference_pooled),
                "forgetting_ci": ci["forgetting_ci"],
                "delta": {
                    "wer": {s: wer[s] - reference_wer[s] for s in columns},
                    "wer_ci": ci["delta_wer_ci"],
                    "average_wer": average_wer(wer) - average_wer(reference_wer),
                    "average_wer_ci": ci["delta_average_wer_ci"],
                },
                "transcripts": dict(source.transcripts) if source.transcripts is not None else None,
                "per_utterance": _per_utterance_columns(utterances[model]) if utterances else None,
            }
        )
    return {
        "reference_model": reference_model,
        "forgetting_sets": forgetting_sets,
        "sets": columns,
        "bootstrap": bootstrap.as_dict(),
        "normalization": _normalization_mapping(normalization),
        "note": note,
        "utterance_words": words,
        "models": models,
    }


def results_from_report(report: Mapping[str, Any]) -> dict[str, dict[str, WerStats | list[WerStats]]]:
    """The counts a report was built from, e.g. to add a model and rebuild it: a list of
    per-utterance counts per set where the report keeps them, else the pooled counts."""
    words = report.get("utterance_words")
    if words is None:
        return {
            m["name"]: {s: _as_stats(counts, m["name"], s) for s, counts in m["stats"].items()}
            for m in report["models"]
        }
    return {
        m["name"]: {s: _from_columns(m["per_utterance"][s], words[s]) for s in report["sets"]} for m in report["models"]
    }


def _from_columns(columns: Mapping[str, Sequence[int]], words: Sequence[int]) -> list[WerStats]:
    """Per-utterance counts from a report's columns; 0 words marks an utterance skipped as empty."""
    return [
        WerStats(substitutions=s, deletions=d, insertions=i, words=w, utterances=1) if w else WerStats(skipped_empty=1)
        for s, d, i, w in zip(*(columns[k] for k in _ERRORS), words, strict=True)
    ]


def format_forgetting(value: float | None) -> str:
    """One decimal with its sign; "n/a" when undefined.

    >>> format_forgetting(20.0), format_forgetting(-3.14), format_forgetting(-0.04), format_forgetting(None)
    ('+20.0', '-3.1', '+0.0', 'n/a')
    """
    if value is None:
        return "n/a"
    return f"{round(value, 1) + 0.0:+.1f}"  # + 0.0 turns a rounded -0.0 into 0.0


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def with_interval(text: str, interval: Sequence[float] | None) -> str:
    """``text`` and half the interval's width, one decimal (``64.95 ±1.8``); ``text``
    alone without an interval. The bounds themselves are in ``report.json``.

    >>> with_interval("64.95", [63.2, 66.8]), with_interval("n/a", None)
    ('64.95 ±1.8', 'n/a')
    """
    return text if interval is None else f"{text} ±{(interval[1] - interval[0]) / 2:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]


def _explanation(report: Mapping[str, Any]) -> list[str]:
    """What the tables' numbers mean, how the intervals were drawn, and the normalisation."""
    pooled = " + ".join(report["forgetting_sets"])
    lines = [
        f"WER in %. Average: mean of the per-set WERs. % Forgetting: relative increase of the pooled "
        f"WER on {pooled} (errors and words summed) over the reference model `{report['reference_model']}`"
        "; n/a where the reference's pooled WER is 0. Difference: this row's WER minus the reference's, in points."
    ]
    if any(ci is not None for m in report["models"] for ci in m["wer_ci"].values()):
        b = report["bootstrap"]
        lines.append(
            f"±: half the width of the {100 * b['confidence']:g}% bootstrap interval ({b['resamples']} resamples of "
            f"each set's utterances, seed {b['seed']}; bounds in report.json). Differences and % Forgetting are "
            "paired: both models on the same resampled utterances. An interval containing 0 means the difference "
            "is within the noise of this many utterances."
        )
    normalization = report["normalization"]
    stated = ", ".join(f"{k}: {json.dumps(v)}" for k, v in normalization.items()) if normalization else "not stated"
    lines.append(f"Text normalisation of references and hypotheses: {stated}.")
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """Table VII's layout (Procedure | each set | Average | % Forgetting), then each row's
    paired difference to the reference, with intervals where the report has them."""
    sets = report["sets"]
    wers = [
        [
            m["name"],
            *(with_interval(f"{m['wer'][s]:.2f}", m["wer_ci"][s]) for s in sets),
            with_interval(f"{m['average_wer']:.2f}", m["average_wer_ci"]),
            with_interval(format_forgetting(m["forgetting_pct"]), m["forgetting_ci"]),
        ]
        for m in report["models"]
    ]
    deltas = [
        [
            m["name"],
            *(with_interval(f"{m['delta']['wer'][s]:+.2f}", m["delta"]["wer_ci"][s]) for s in sets),
            with_interval(f"{m['delta']['average_wer']:+.2f}", m["delta"]["average_wer_ci"]),
        ]
        for m in report["models"]
    ]
    reference = next(m for m in report["models"] if m["name"] == report["reference_model"])
    sizes = ", ".join(
        f"{s} {reference['stats'][s]['utterances']} ({reference['stats'][s]['words']} words)" for s in sets
    )
    note = [f"**{report['note']}**", ""] if report["note"] else []
    return "\n".join([
        "# WER and forgetting", "", *note,
        *_table(["Procedure", *sets, "Average", "% Forgetting"], wers), "",
        f"## Difference to `{report['reference_model']}`", "",
        *_table(["Procedure", *sets, "Average"], deltas), "",
        f"Utterances per set: {sizes}.", "", *(line for text in _explanation(report) for line in (text, "")),
    ])


def _json_value(value: Any, indent: int) -> str:
    """JSON indented by two per level, except that a list of numbers (an interval, a
    column of per-utterance counts) stays on one line."""
    pad = " " * (indent + 2)
    if isinstance(value, Mapping) and value:
        items = [f"{pad}{json.dumps(str(k))}: {_json_value(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in value):
        return "[\n" + ",\n".join(pad + _json_value(v, indent + 2) for v in value) + "\n" + " " * indent + "]"
    return json.dumps(value, allow_nan=False)


def _json_text(report: Mapping[str, Any]) -> str:
    try:
        return _json_value(report, 0) + "\n"
    except ValueError as e:  # a NaN WER: a set with no words slipped past build_report
        raise EvaluationError(f"report holds a non-finite number ({e})") from None


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir``, each
    atomically (an earlier file stays whole if writing fails). Returns their paths."""
    out_dir = Path(out_dir)
    paths = {kind: out_dir / f"report.{kind}" for kind in ("json", "md", "png")}
    text = _json_text(report)
    write_atomically(paths["json"], lambda tmp: tmp.write_text(text, encoding="utf-8"))
    markdown = render_markdown(report)
    write_atomically(paths["md"], lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    from merge_core.evaluation.plot import plot_report  # here, not above: plot imports this module

    write_atomically(paths["png"], lambda tmp: plot_report(report, tmp))
    return paths
