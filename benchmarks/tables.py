"""Text tables of the benchmarks' results: fixed-width columns, PASS/FAIL lines, and the
two tables of the benchmarks that pit asr-merge (``ours``) against a toolkit's own way
(``legacy``): every variant's time and memory, and ours over legacy."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.measure import Result, gib


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@dataclass(frozen=True)
class Column:
    title: str
    width: int = 0
    align: str = ">"  # a format-spec alignment: "<" or ">"
    gap: int = 1  # spaces before the column (ignored for the first)


def render_table(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> list[str]:
    """Header, a rule as long as the header, and one line per row of preformatted cells."""

    def line(cells: Sequence[str]) -> str:
        parts = [f"{cell:{c.align}{c.width or ''}}" for c, cell in zip(columns, cells)]
        return parts[0] + "".join(" " * c.gap + part for c, part in zip(columns[1:], parts[1:]))

    head = line([c.title for c in columns])
    return [head, "-" * len(head), *(line(row) for row in rows)]


def print_report(sections: Sequence[Sequence[str]], started: float) -> None:
    """The report's sections (lists of lines) separated by blank lines, after a blank
    line, then the time since ``started`` (a ``time.perf_counter()`` reading)."""
    print()
    print("\n\n".join("\n".join(lines) for lines in sections))
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")


# ------------------------------------------------------------- ours against legacy


VARIANTS = [
    Column("variant", 28, "<"), Column("work s", 7), Column("process s", 9), Column("cpu s", 7),
    Column("peak RSS GiB", 12), Column("peak priv GiB", 13), Column("idle priv GiB", 13), Column("other cpu", 9),
]
RATIOS = [
    Column("ours / legacy", 28, "<"), Column("work s", 7), Column("process s", 9), Column("peak RSS", 9),
    Column("peak priv", 9), Column("priv above idle", 15),
]


def variant_table(results: Sequence[Result]) -> list[str]:
    """Time and memory of every variant: ``work s`` the timed work, ``process s`` the
    child from start to exit, ``idle priv`` its private memory after the imports."""
    rows = [
        [
            r.variant,
            f"{r.wall_s:.2f}",
            f"{r.process_s:.2f}",
            f"{r.cpu_s:.2f}",
            f"{gib(r.peak_rss_kib):.3f}",
            f"{gib(r.peak_anon_kib):.3f}",
            f"{gib(r.idle_anon_kib):.3f}",
            f"{r.other_cores:.2f}",
        ]
        for r in results
    ]
    return render_table(VARIANTS, rows)


def ratio_table(results: Sequence[Result]) -> list[str]:
    """Every other variant over the one whose name starts with ``legacy``."""
    legacy = next(r for r in results if r.variant.startswith("legacy"))
    rows = [
        [
            r.variant,
            f"{r.wall_s / legacy.wall_s:.2f}",
            f"{r.process_s / legacy.process_s:.2f}",
            f"{r.peak_rss_kib / legacy.peak_rss_kib:.2f}",
            f"{r.peak_anon_kib / legacy.peak_anon_kib:.2f}",
            f"{(r.peak_anon_kib - r.idle_anon_kib) / (legacy.peak_anon_kib - legacy.idle_anon_kib):.2f}",
        ]
        for r in results
        if r is not legacy
    ]
    return render_table(RATIOS, rows)
