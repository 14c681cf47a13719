"""The picture of a forgetting-budget search (:mod:`merge_core.recipes.search`): every trial
as a point of original-domain forgetting against mean target-domain dev WER, the Pareto
front of the two, the fixed recipes labelled, the budget as a line, the chosen trial marked.

Both axes are minimised: a trial is on the front when no other trial has both less
forgetting and a lower target WER (:func:`pareto_front`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from merge_core.atomic import write_atomically
from merge_core.evaluation.plot import DPI, agg_figure


# forgetting ticks, wherever the axis reaches (the budget and the end of the linear part are added)
_TICKS = (-100, -50, -20, -10, -2, -1, 0, 1, 2, 10, 20, 50, 100, 200, 500, 1000)


@dataclass(frozen=True)
class SearchPoint:
    """One finished trial as the plot shows it (both numbers in %)."""

    number: int
    forgetting_pct: float
    objective: float  # (weighted) mean target-domain dev WER
    feasible: bool
    baseline: str | None = None  # the fixed recipe it is (AoDE, TIES, ...), if any


def pareto_front(points: Sequence[SearchPoint]) -> list[SearchPoint]:
    """The non-dominated points (less forgetting or lower WER than every other point),
    by increasing forgetting.

    >>> pts = [SearchPoint(0, 1.0, 50.0, True), SearchPoint(1, 2.0, 40.0, True), SearchPoint(2, 3.0, 45.0, False)]
    >>> [p.number for p in pareto_front(pts)]
    [0, 1]
    """
    front: list[SearchPoint] = []
    for point in sorted(points, key=lambda p: (p.forgetting_pct, p.objective, p.number)):
        if not front or point.objective < front[-1].objective:
            front.append(point)
    return front


def _draw(
    points: Sequence[SearchPoint],
    budget: float,
    chosen: int | None,
    reference_objective: float,
    title: str,
    dest: Path,
) -> None:
    from matplotlib.ticker import FuncFormatter

    fig = agg_figure(8.0, 5.5)
    ax = fig.subplots()
    for feasible, style in ((True, {"marker": "o", "color": "tab:blue"}), (False, {"marker": "x", "color": "tab:gray"})):
        group = [p for p in points if p.feasible == feasible and p.baseline is None]
        label = "trial within budget" if feasible else "trial over budget"
        ax.scatter([p.forgetting_pct for p in group], [p.objective for p in group], s=28, label=label, **style)
    front = pareto_front(points)
    ax.step([p.forgetting_pct for p in front], [p.objective for p in front], where="post", color="tab:blue",
            alpha=0.4, linewidth=1.2, label="Pareto front")
    fixed = [p for p in points if p.baseline is not None]
    ax.scatter([p.forgetting_pct for p in fixed], [p.objective for p in fixed], marker="s", s=46, color="tab:orange",
               label="fixed recipe", zorder=3)
    for p in fixed:
        ax.annotate(p.baseline, (p.forgetting_pct, p.objective), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.scatter([0.0], [reference_objective], marker="D", s=46, color="black", label="generalist", zorder=3)
    ax.axvline(budget, color="tab:red", linestyle="--", linewidth=1.2, label=f"budget: {budget:g}% forgetting")
    best = [p for p in points if p.number == chosen]
    if best:
        ax.scatter([best[0].forgetting_pct], [best[0].objective], marker="*", s=260, color="tab:green",
                   edgecolor="black", label=f"chosen: trial {chosen}", zorder=4)
    # linear around the budget, logarithmic beyond: a trial that forgot 100 % does not squeeze the rest into a line
    linear = max(1.0, 4 * abs(budget))
    ax.set_xscale("symlog", linthresh=linear, linscale=2.0)
    low, high = ax.get_xlim()
    ax.set_xticks([t for t in sorted({*_TICKS, budget, linear, -linear}) if low <= t <= high])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel(f"original-domain forgetting on dev (%, relative pooled WER increase; log scale beyond ±{linear:g})")
    ax.set_ylabel("mean target-domain dev WER (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(dest, format="png", dpi=DPI)


def plot_search(
    points: Sequence[SearchPoint],
    *,
    budget: float,
    chosen: int | None,
    reference_objective: float,
    title: str,
    dest: str | Path,
) -> Path:
    """Write the search's plot to ``dest`` (PNG, atomically); returns ``dest``.

    Parameters
    ----------
    points : sequence of SearchPoint
        Every finished trial.
    budget : float
        ``max_forgetting_pct``, drawn as a vertical line.
    chosen : int or None
        The number of the trial that was written (None: none was).
    reference_objective : float
        The generalist's own mean target dev WER, drawn at 0 % forgetting.
    title : str
        The plot's title (the study's name).
    dest : path
        The PNG file.
    """
    dest = Path(dest)
    write_atomically(dest, lambda tmp: _draw(points, budget, chosen, reference_objective, title, tmp))
    return dest
