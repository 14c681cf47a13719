"""The report's figure, ``report.png`` (:mod:`merge_core.evaluation.report` has the schema it
reads), made to be read at a glance for 1 to ~30 models and 2 to ~10 test sets:

1. **WER heat map**: a row per model, a column per test set and the Average, each cell
   holding its WER. The colour is the difference to the reference model's WER in that
   column (blue: lower, red: higher), bold where the bootstrap interval of the difference
   excludes 0. The reference row is framed.
2. **% forgetting** per model, beside its heat-map row, with its bootstrap interval.
3. **Mean target WER against % forgetting**: the mean WER over the sets that are not
   forgetting sets, one point per model numbered as the heat map's rows; lower left is
   better on both. The dotted lines cross at the reference.

Intervals, the significance marks and the note (a subtitle, e.g. a smoke run's warning) are
drawn only where the report has them. The figure is sized from the number of models, sets
and the longest name.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from merge_core.evaluation.report import format_forgetting

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 120
# inches: a heat-map cell, a 9 pt character (DejaVu Sans averages 0.6 em), the two other panels
_CELL_W, _ROW_H, _CHAR_W = 0.62, 0.3, 0.075
_BARS_W, _SCATTER_W = 3.2, 4.8
_LOWER, _HIGHER = "tab:blue", "tab:red"
_FONT = 8  # points, of the numbers in cells, by bars and points


def agg_figure(width: float, height: float) -> Figure:
    """A constrained-layout Figure of ``width`` x ``height`` inches on its own Agg canvas:
    no pyplot, so no global backend switch and no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@dataclass(frozen=True)
class _Row:
    """One model as the figure shows it (WERs in %)."""

    label: str  # "3  AoDE": the number is its point's in the scatter
    wer: list[float]  # per set, then the Average
    significant: list[bool]  # per cell: the difference to the reference is outside its interval
    forgetting: float | None
    forgetting_ci: tuple[float, float] | None
    target_wer: float
    reference: bool


def _interval(value: Any) -> tuple[float, float] | None:
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and None not in value:
        return float(value[0]), float(value[1])
    return None


def _excludes_zero(value: Any) -> bool:
    interval = _interval(value)
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def _rows(report: Mapping[str, Any], targets: Sequence[str]) -> list[_Row]:
    sets = report["sets"]
    rows = []
    for number, m in enumerate(report["models"], start=1):
        delta = m.get("delta") or {}
        cis = delta.get("wer_ci") or {}
        rows.append(
            _Row(
                label=f"{number}  {m['name']}",
                wer=[*(m["wer"][s] for s in sets), m["average_wer"]],
                significant=[*(_excludes_zero(cis.get(s)) for s in sets), _excludes_zero(delta.get("average_wer_ci"))],
                forgetting=m.get("forgetting_pct"),
                forgetting_ci=_interval(m.get("forgetting_ci")),
                target_wer=sum(m["wer"][s] for s in targets) / len(targets) if targets else m["average_wer"],
                reference=m["name"] == report["reference_model"],
            )
        )
    return rows


def _colour_span(differences: list[float]) -> float:
    """The |difference| at which colours saturate: the 90th percentile of the non-zero ones,
    so that one outlying cell does not wash out every other."""
    sizes = sorted(abs(d) for d in differences if d)
    return sizes[int(0.9 * (len(sizes) - 1))] if sizes else 1.0


def _ink(rgba: tuple[float, ...]) -> str:
    """Black on light cells, white on dark ones (luma of the cell's colour)."""
    red, green, blue = rgba[:3]
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


def _draw_heat_map(ax: Axes, rows: list[_Row], columns: list[str], report: Mapping[str, Any]) -> None:
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    reference = next(r.wer for r in rows if r.reference)
    differences = [[w - ref for w, ref in zip(r.wer, reference)] for r in rows]
    span = _colour_span([d for row in differences for d in row])
    norm = Normalize(-span, span, clip=True)
    image = ax.imshow(differences, cmap="RdBu_r", norm=norm, aspect="auto")
    for i, row in enumerate(rows):
        for j, wer in enumerate(row.wer):
            weight = "bold" if row.significant[j] else "normal"
            colour = _ink(image.cmap(norm(differences[i][j])))
            cell = ax.text(j, i, f"{wer:.1f}", ha="center", va="center", fontsize=_FONT, color=colour, fontweight=weight)
            cell.set_in_layout(False)  # inside the axes: measuring hundreds of them would only cost time
        if row.reference:
            ax.add_patch(Rectangle((-0.5, i - 0.5), len(columns), 1, fill=False, edgecolor="black", linewidth=1.6))
    ax.axvline(len(columns) - 1.5, color="white", linewidth=3)  # the Average apart from the sets
    ax.xaxis.tick_top()
    tilted = max(map(len, columns)) * _CHAR_W > _CELL_W
    ax.set_xticks(range(len(columns)), columns, rotation=40 if tilted else 0, ha="left" if tilted else "center",
                  rotation_mode="anchor")
    ax.set_yticks(range(len(rows)), [r.label for r in rows])
    for label, row in zip(ax.get_yticklabels(), rows):
        label.set_fontweight("bold" if row.reference else "normal")
    ax.tick_params(length=0)
    title = f"WER (%); colour: vs {report['reference_model']} (framed)\nblue lower, red higher"
    if any(any(r.significant) for r in rows):
        title += f"; bold: {_confidence(report)} interval excludes 0"
    ax.set_title(title, fontsize=9)


def _confidence(report: Mapping[str, Any]) -> str:
    confidence = (report.get("bootstrap") or {}).get("confidence")
    return f"its {100 * confidence:g}%" if confidence else "its"


def _draw_forgetting(ax: Axes, rows: list[_Row], report: Mapping[str, Any]) -> None:
    values = [r.forgetting if r.forgetting is not None else 0.0 for r in rows]
    ax.barh(range(len(rows)), values, height=0.6, color=[_HIGHER if v > 0 else _LOWER for v in values])
    with_ci = _forgetting_intervals(ax, rows, range(len(rows)), "black")
    for i, row in enumerate(rows):
        value = row.forgetting if row.forgetting is not None else 0.0
        low, high = row.forgetting_ci or (value, value)
        end, side = (max(value, high), 1) if value >= 0 else (min(value, low), -1)
        text = "reference" if row.reference else format_forgetting(row.forgetting)
        ax.annotate(text, (end, i), xytext=(3 * side, 0), textcoords="offset points", fontsize=_FONT,
                    ha="left" if side > 0 else "right", va="center")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.tick_params(left=False, labelleft=False)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.3)
    if not any(values) and not with_ci:
        ax.set_xlim(-1.0, 1.0)  # every bar is 0 or n/a: nothing to scale the axis by
    ax.set_xlabel("% forgetting (relative pooled WER increase)")
    ax.set_title(f"Forgetting vs {report['reference_model']}\n({' + '.join(report['forgetting_sets'])})", fontsize=9)


def _forgetting_intervals(ax: Axes, rows: list[_Row], ys: Sequence[float], colour: str) -> bool:
    """Each defined forgetting's interval as a horizontal error bar at its ``ys``; whether there was any."""
    drawn = [(r.forgetting, r.forgetting_ci, y) for r, y in zip(rows, ys) if r.forgetting is not None and r.forgetting_ci]
    if drawn:
        # distances below and above each value (0 where the interval misses it)
        below = [max(v - low, 0.0) for v, (low, _), _ in drawn]
        above = [max(high - v, 0.0) for v, (_, high), _ in drawn]
        ax.errorbar([v for v, _, _ in drawn], [y for _, _, y in drawn], xerr=[below, above], fmt="none",
                    ecolor=colour, elinewidth=0.9, capsize=2)
    return bool(drawn)


def _draw_scatter(ax: Axes, rows: list[_Row], targets: Sequence[str]) -> None:
    _forgetting_intervals(ax, rows, [r.target_wer for r in rows], "gray")
    others = [r for r in rows if r.forgetting is not None and not r.reference]
    ax.scatter([r.forgetting for r in others], [r.target_wer for r in others], s=30, zorder=3,
               color=[_HIGHER if r.forgetting > 0 else _LOWER for r in others])
    reference = next(r for r in rows if r.reference)
    if reference.forgetting is not None:
        ax.scatter([reference.forgetting], [reference.target_wer], marker="D", s=40, color="black", zorder=3)
        ax.axvline(reference.forgetting, color="gray", linestyle=":", linewidth=1)
        ax.axhline(reference.target_wer, color="gray", linestyle=":", linewidth=1)
    missing = [r.label.split()[0] for r in rows if r.forgetting is None]
    if missing:
        ax.text(0.01, 0.01, textwrap.fill(f"not shown, forgetting n/a: {', '.join(missing)}", 50),
                transform=ax.transAxes, fontsize=7, va="bottom")
    ax.margins(0.12)
    ax.grid(alpha=0.3)
    ax.set_xlabel("% forgetting")
    if not targets:
        ax.set_ylabel("Average WER (%)")  # every set is a forgetting set
    elif len(targets) <= 3:
        ax.set_ylabel(f"mean WER on {', '.join(targets)} (%)")
    else:
        ax.set_ylabel(f"mean WER on the {len(targets)} target sets (%)")
    ax.set_title("Target WER vs forgetting\n(lower left: better on both; numbers: rows)", fontsize=9)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(width, 0.0) * max(height, 0.0)


def _number_points(ax: Axes, rows: list[_Row]) -> None:
    """Each point's number beside it, where it overlaps the fewest numbers and markers placed
    so far (eight places around the point, then eight farther out with a leader line). The
    figure's layout must be settled: it decides where the points land."""
    points = [(r.forgetting, r.target_wer, r.label.split()[0]) for r in rows if r.forgetting is not None]
    to_points = 72.0 / ax.get_figure().dpi
    centres = [[c * to_points for c in ax.transData.transform((x, y))] for x, y, _ in points]
    marker = 4.0  # half a marker, in points
    taken = [(x - marker, y - marker, x + marker, y + marker) for x, y in centres]
    for (x, y, text), (cx, cy) in zip(points, centres):
        half_w, half_h = 0.3 * _FONT * len(text) + 1, 0.5 * _FONT + 1
        places = [
            (sx * (marker + half_w + 1) * ring, sy * (marker + half_h + 1) * ring)
            for ring in (1, 2.2)
            for sx, sy in ((1, 1), (-1, 1), (1, -1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
        ]
        boxes = [(cx + dx - half_w, cy + dy - half_h, cx + dx + half_w, cy + dy + half_h) for dx, dy in places]
        best = min(range(len(places)), key=lambda k: sum(_overlap(boxes[k], t) for t in taken))
        taken.append(boxes[best])
        leader = {"arrowprops": {"arrowstyle": "-", "color": "gray", "lw": 0.5}} if best >= 8 else {}
        ax.annotate(text, (x, y), xytext=places[best], textcoords="offset points", ha="center", va="center",
                    fontsize=_FONT, **leader)


def _size(rows: list[_Row], columns: list[str], note: str | None) -> tuple[float, float, float]:
    """(width, height, heat-map width), in inches, from the counts and the longest names."""
    heat_w = len(columns) * _CELL_W
    labels_w = 0.3 + max(len(r.label) for r in rows) * _CHAR_W
    longest_column = max(map(len, columns)) * _CHAR_W
    header_h = 0.3 + (0.65 * longest_column if longest_column > _CELL_W else 0.2)
    width = labels_w + heat_w + _BARS_W + _SCATTER_W + 0.6
    note_h = 0.25 * len(_wrapped(note, width)) if note else 0.0
    return width, max(3.5, len(rows) * _ROW_H + header_h + 1.4) + note_h, heat_w


def _wrapped(note: str, width_in: float) -> list[str]:
    """The note's lines at 10 pt across ``width_in`` inches."""
    return textwrap.wrap(note, max(40, int(width_in / (_CHAR_W * 10 / 9))))


def _report_figure(report: Mapping[str, Any]) -> Figure:
    """The three panels of ``report`` on one Figure (not yet saved)."""
    targets = [s for s in report["sets"] if s not in report["forgetting_sets"]]
    rows = _rows(report, targets)
    columns = [*report["sets"], "Average"]
    note = report.get("note")
    width, height, heat_w = _size(rows, columns, note)
    fig = agg_figure(width, height)
    grid = fig.add_gridspec(1, 3, width_ratios=[heat_w, _BARS_W, _SCATTER_W])
    ax_heat = fig.add_subplot(grid[0])
    ax_bars = fig.add_subplot(grid[1], sharey=ax_heat)  # each bar beside its heat-map row
    ax_scatter = fig.add_subplot(grid[2])
    _draw_heat_map(ax_heat, rows, columns, report)
    _draw_forgetting(ax_bars, rows, report)
    ax_heat.set_ylim(len(rows) - 0.5, -0.5)  # the first model on top, as in the table
    if note:
        fig.suptitle("\n".join(_wrapped(note, width)), fontsize=10, color="tab:red")
    _draw_scatter(ax_scatter, rows, targets)
    fig.draw_without_rendering()
    fig.set_layout_engine("none")  # settled, so that the numbers placed on it stay beside their points
    _number_points(ax_scatter, rows)
    return fig


def plot_report(report: Mapping[str, Any], dest: Path) -> None:
    """Draw ``report`` (the ``report.json`` schema of :mod:`merge_core.evaluation.report`)
    as a PNG at ``dest``: WER heat map, forgetting bars and target WER against forgetting.

    Parameters
    ----------
    report : mapping
        A report as :func:`~merge_core.evaluation.report.build_report` returns it; the
        bootstrap intervals (``wer_ci``, ``forgetting_ci``, ``delta``), ``bootstrap`` and
        ``note`` are drawn when present and not null.
    dest : path
        The PNG file, written in place (:func:`~merge_core.evaluation.report.write_report`
        writes it atomically).
    """
    _report_figure(report).savefig(dest, format="png", dpi=DPI)
