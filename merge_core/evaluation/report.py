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

``report.json`` schema (all WERs are percentages, unrounded)::

    {
      "reference_model": "generalist",
      "forgetting_sets": ["test_clean", "test_other"],
      "sets": ["noise", "phone", "test_clean", "test_other"],   # column order
      "models": [                                               # row order
        {
          "name": "generalist",
          "wer": {"noise": 12.3, ...},                           # every set
          "stats": {"noise": {"substitutions": int, "deletions": int,
                              "insertions": int, "words": int,
                              "utterances": int, "skipped_empty": int,
                              "wer": 12.3}, ...},
          "average_wer": 8.1,
          "pooled_reference_wer": 4.2,
          "forgetting_pct": 0.0                                  # or null
        },
        ...
      ]
    }

Columns default to the non-forgetting (domain) sets in the order they first
appear in the results, then the forgetting sets in the given order; rows follow
the results' order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from merge_core.atomic import write_atomically
from merge_core.errors import EvaluationError
from merge_core.evaluation.wer import WerStats

DEFAULT_FORGETTING_SETS = ("test_clean", "test_other")
# a bar's number at 7 pt ("100.0") fits across a bar this wide, in inches, or along one this wide
_LABEL_ACROSS_IN, _LABEL_ALONG_IN = 0.3, 0.12

Results = Mapping[str, Mapping[str, Any]]  # model -> set -> WerStats (or its as_dict())


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


def _as_stats(value: Any, model: str, set_name: str) -> WerStats:
    if isinstance(value, WerStats):
        stats = value
    elif isinstance(value, Mapping):
        try:
            stats = WerStats.from_mapping(value)
        except EvaluationError as e:
            raise EvaluationError(f"model {model!r}, set {set_name!r}: {e}") from None
    else:
        raise EvaluationError(f"model {model!r}, set {set_name!r}: expected WerStats, got {type(value).__name__}")
    if stats.words == 0:
        raise EvaluationError(
            f"model {model!r}, set {set_name!r}: no reference words "
            f"({stats.skipped_empty} utterance(s) skipped as empty), so no WER"
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


def _model_stats(results: Results, sets: Sequence[str]) -> dict[str, dict[str, WerStats]]:
    table = {}
    for model, per_set in results.items():
        missing = [s for s in sets if s not in per_set]
        if missing:
            raise EvaluationError(f"model {model!r} has no results for set(s) {', '.join(map(repr, missing))}")
        table[model] = {s: _as_stats(per_set[s], model, s) for s in sets}
    return table


def _pct(stats: WerStats) -> float:
    return 100.0 * stats.wer


def build_report(
    results: Results,
    reference_model: str,
    forgetting_sets: Sequence[str] = DEFAULT_FORGETTING_SETS,
    sets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The report dict (schema in the module docstring) of ``results``, which maps
    model name -> set name -> :class:`WerStats` (or its :meth:`~WerStats.as_dict`).

    ``sets`` fixes the column order (it must include the forgetting sets); by
    default, domain sets first, then the forgetting sets. Every model must have
    every reported set.
    """
    if not results:
        raise EvaluationError("no models to report")
    if reference_model not in results:
        raise EvaluationError(f"reference model {reference_model!r} is not among the models: {', '.join(results)}")
    forgetting_sets = list(forgetting_sets)
    if not forgetting_sets or len(set(forgetting_sets)) != len(forgetting_sets):
        raise EvaluationError(f"forgetting sets must be distinct and at least one, got {forgetting_sets}")
    columns = _ordered_sets(results, forgetting_sets, sets)
    table = _model_stats(results, columns)
    reference_pooled = _pct(pooled_stats(table[reference_model], forgetting_sets))
    models = []
    for model, stats in table.items():
        wer = {s: _pct(stats[s]) for s in columns}
        pooled = _pct(pooled_stats(stats, forgetting_sets))
        models.append(
            {
                "name": model,
                "wer": wer,
                "stats": {s: {**stats[s].as_dict(), "wer": wer[s]} for s in columns},
                "average_wer": average_wer(wer),
                "pooled_reference_wer": pooled,
                "forgetting_pct": forgetting_pct(pooled, reference_pooled),
            }
        )
    return {
        "reference_model": reference_model,
        "forgetting_sets": forgetting_sets,
        "sets": columns,
        "models": models,
    }


def results_from_report(report: Mapping[str, Any]) -> dict[str, dict[str, WerStats]]:
    """The counts a report was built from, e.g. to add a model and rebuild it."""
    return {
        m["name"]: {s: _as_stats(counts, m["name"], s) for s, counts in m["stats"].items()} for m in report["models"]
    }


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


def render_markdown(report: Mapping[str, Any]) -> str:
    """Table VII's layout: Procedure | each set | Average | % Forgetting."""
    sets = report["sets"]
    header = ["Procedure", *sets, "Average", "% Forgetting"]
    lines = [
        "| " + " | ".join(map(_cell, header)) + " |",
        "|" + "---|" + "---:|" * (len(header) - 1),
    ]
    for m in report["models"]:
        row = [m["name"], *(f"{m['wer'][s]:.2f}" for s in sets), f"{m['average_wer']:.2f}"]
        row.append(format_forgetting(m["forgetting_pct"]))
        lines.append("| " + " | ".join(map(_cell, row)) + " |")
    reference = next(m for m in report["models"] if m["name"] == report["reference_model"])
    sizes = ", ".join(
        f"{s} {reference['stats'][s]['utterances']} ({reference['stats'][s]['words']} words)" for s in sets
    )
    pooled = " + ".join(report["forgetting_sets"])
    note = (
        f"WER in %. Average: mean of the per-set WERs. % Forgetting: relative increase of the pooled "
        f"WER on {pooled} (errors and words summed) over the reference model `{report['reference_model']}`"
        "; n/a where the reference's pooled WER is 0."
    )
    return "\n".join(["# WER and forgetting", "", *lines, "", f"Utterances per set: {sizes}.", "", note, ""])


def _plot(report: Mapping[str, Any], dest: Path) -> None:
    # The figure is drawn on an explicit Agg canvas: no pyplot, so no global
    # backend switch and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sets = [*report["sets"], "Average"]
    models = report["models"]
    n = len(models)
    width = min(0.8 / n, 0.35)
    left_w = max(6.0, 0.5 + len(sets) * (n * width + 0.4) * 1.1)
    right_w = 4.5
    fig = Figure(figsize=(left_w + right_w, max(4.5, 2.5 + 0.35 * n + 0.2 * math.ceil(n / 4))), layout="constrained")
    FigureCanvasAgg(fig)
    ax_wer, ax_fgt = fig.subplots(1, 2, gridspec_kw={"width_ratios": [left_w, right_w]})
    colors = [f"C{i % 10}" for i in range(n)]

    # a bar's width on paper decides its number: across it, along it, or none (the table has them)
    bar_inches = width * 0.85 * left_w / len(sets)
    along = {"rotation": 90} if bar_inches < _LABEL_ACROSS_IN else {}
    for i, m in enumerate(models):
        values = [*(m["wer"][s] for s in report["sets"]), m["average_wer"]]
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(sets))]
        bars = ax_wer.bar(xs, values, width, label=m["name"], color=colors[i])
        if bar_inches >= _LABEL_ALONG_IN:
            ax_wer.bar_label(bars, fmt="%.1f", fontsize=7, padding=1, **along)
    crowded = len(sets) > 4 or max(map(len, sets)) > 12
    ax_wer.set_xticks(range(len(sets)), sets, rotation=20 if crowded else 0, ha="right" if crowded else "center")
    ax_wer.set_ylabel("WER (%)")
    ax_wer.set_title("WER per test set")
    # Below the plot: inside it, the legend would hide the tallest bars.
    handles, labels = ax_wer.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(n, 4), fontsize=8, frameon=False)
    ax_wer.margins(y=0.25 if along else 0.15)

    names = [m["name"] for m in models]
    values = [m["forgetting_pct"] for m in models]
    ys = range(n)
    shown = [v if v is not None else 0.0 for v in values]
    bars = ax_fgt.barh(ys, shown, color=["tab:red" if v > 0 else "tab:green" for v in shown], height=0.6)
    ax_fgt.bar_label(bars, labels=[format_forgetting(v) for v in values], fontsize=8, padding=2)
    ax_fgt.axvline(0.0, color="black", linewidth=0.8)
    ax_fgt.set_yticks(list(ys), names)
    ax_fgt.invert_yaxis()  # first model on top, as in the table
    ax_fgt.set_xlabel("% forgetting (relative pooled WER increase)")
    ax_fgt.set_title(f"Forgetting vs {report['reference_model']}\n({' + '.join(report['forgetting_sets'])})")
    ax_fgt.margins(x=0.25)
    fig.savefig(dest, format="png", dpi=120)


def _json_text(report: Mapping[str, Any]) -> str:
    try:
        return json.dumps(report, indent=2, allow_nan=False) + "\n"
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
    write_atomically(paths["png"], lambda tmp: _plot(report, tmp))
    return paths
