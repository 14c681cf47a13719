"""The papers' findings checked against a demo's report, each with a verdict that allows
for the noise of a test set this size.

A finding rests on comparisons of rows: A forgets less than B, A's WER on a domain is
below B's. Each comparison is judged by the paired bootstrap interval of the difference
``A - B`` (:class:`~merge_core.evaluation.bootstrap.PairedBootstrap`: both rows on the same
resampled utterances, the resamples the report's own intervals came from): it **holds**
when the interval lies wholly on the claimed side of 0, **fails** when it lies wholly on
the other side, and is **within noise** when it contains 0 (two identical rows always
are). A finding of several comparisons holds when every one holds, fails when any fails,
and is within noise otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from merge_core.app.experiment.plan import TARGETS
from merge_core.app.experiment.procedures import SEARCH_ROW_FORMAT, round_name
from merge_core.errors import EvaluationError
from merge_core.evaluation.bootstrap import PairedBootstrap, percentile_intervals

HOLDS, WITHIN_NOISE, FAILS = "holds", "within noise", "fails"
# the demo experiment's settings its findings are about (configs/experiments/demo_*.yaml)
ROUNDS = 3  # iterative AoDE's rounds, the first AoDE itself
EDITS = ("TA", "TIES")  # sequential editing's labels: task arithmetic, then TIES
SEARCH_BUDGET = 1.0  # % forgetting: the forgetting-budget search's row
SEARCH_ROW = SEARCH_ROW_FORMAT.format(budget=SEARCH_BUDGET)


def flat_name(domain: str) -> str:
    """The row of ``domain``'s fine-tune without LLRD."""
    return f"FT {domain} without LLRD"


@dataclass(frozen=True)
class Quantity:
    """A number of the report (or a constant), with its resampled values: an array of
    the bootstrap's resamples, a float for a constant, None where it is undefined."""

    label: str
    point: float
    resamples: np.ndarray | float | None


class Evidence:
    """A report's rows and the resamples of its bootstrap, to compare rows with."""

    def __init__(self, report: Mapping[str, Any]) -> None:
        boot = PairedBootstrap.from_report(report)
        if boot is None:
            raise EvaluationError(
                "the demo's claims need the report's per-utterance counts ('utterance_words'), "
                "which a report built from pooled counts lacks"
            )
        self.boot = boot
        self.rows = {m["name"]: m for m in report["models"]}
        self.reference = report["reference_model"]
        self.forgetting_sets = list(report["forgetting_sets"])

    def forgetting(self, name: str) -> Quantity:
        """``name``'s Forgetting % (0 where the report has none, as the table's n/a)."""
        resamples = self.boot.forgetting(name, self.reference, self.forgetting_sets)
        return Quantity(f"forgetting {name}", self.rows[name]["forgetting_pct"] or 0.0, resamples)

    def wer(self, name: str, domain: str) -> Quantity:
        """``name``'s WER on ``domain``'s test set."""
        return Quantity(f"WER {name} on {domain}", self.rows[name]["wer"][domain], self.boot.wer(name, domain))

    def target_wer(self, name: str) -> Quantity:
        """``name``'s mean WER over the target domains' test sets."""
        point = sum(self.rows[name]["wer"][d] for d in TARGETS) / len(TARGETS)
        return Quantity(f"mean target WER {name}", point, self.boot.mean_wer(name, TARGETS))

    def less(self, a: Quantity, b: Quantity) -> dict[str, Any]:
        """The comparison "a < b": the difference ``a - b``, its paired interval and its
        verdict (within noise where either side is undefined in some resample)."""
        interval = None
        if a.resamples is not None and b.resamples is not None:
            difference = np.atleast_1d(np.subtract(a.resamples, b.resamples))
            interval = percentile_intervals(difference, self.boot.settings.confidence)[0]
        return {
            "comparison": f"{a.label} < {b.label}",
            "difference": a.point - b.point,
            "interval": interval,
            "verdict": verdict(interval),
        }


def constant(value: float) -> Quantity:
    """A fixed number (a budget, 0) as a side of a comparison."""
    return Quantity(f"{value:g}", value, value)


def verdict(interval: Sequence[float] | None) -> str:
    """Of the claim that a difference is negative, from its interval.

    >>> verdict([-3.0, -0.5]), verdict([-1.0, 2.0]), verdict([0.0, 0.0]), verdict([0.5, 3.0]), verdict(None)
    ('holds', 'within noise', 'within noise', 'fails', 'within noise')
    """
    if interval is None:
        return WITHIN_NOISE
    lo, hi = interval
    return HOLDS if hi < 0 else FAILS if lo > 0 else WITHIN_NOISE


def combined(comparisons: Sequence[Mapping[str, Any]]) -> str:
    """A finding of several comparisons: fails if any fails, holds if all hold (or there are
    none to make), within noise otherwise."""
    verdicts = {c["verdict"] for c in comparisons}
    return FAILS if FAILS in verdicts else HOLDS if verdicts <= {HOLDS} else WITHIN_NOISE


def _claim(claim: str, comparisons: list[dict[str, Any]], numbers: dict[str, Any]) -> dict[str, Any]:
    return {"claim": claim, "verdict": combined(comparisons), "numbers": numbers, "comparisons": comparisons}


def check_claims(report: Mapping[str, Any], upweighted: str) -> list[dict[str, Any]]:
    """Seeds 000, 002 and 004's findings, each with its verdict (``holds``, ``within noise``
    or ``fails``), the numbers it rests on and its comparisons with their paired intervals;
    a finding is checked when the report has its rows."""
    ev = Evidence(report)
    rows = ev.rows
    forgets = {name: ev.forgetting(name) for name in rows}
    sequential = [n for n in rows if n.startswith("sequential ") and not n.startswith("sequential editing")]
    merges = [n for n in ("AoDE", "AoDE LoRA", f"AoDE {upweighted} x4", "TIES", "task arithmetic") if n in rows]
    claims = [
        _claim(f"fine-tuning on {d} improves {d} and forgets",
               [ev.less(ev.wer(f"FT {d}", d), ev.wer("pretrained", d)), ev.less(constant(0.0), forgets[f"FT {d}"])],
               {"wer_before": rows["pretrained"]["wer"][d], "wer_after": rows[f"FT {d}"]["wer"][d],
                "forgetting_pct": forgets[f"FT {d}"].point})
        for d in TARGETS
    ]
    claims += [
        _claim("sequential fine-tuning forgets more than AoDE",
               [ev.less(forgets["AoDE"], forgets[s]) for s in sequential], _points(forgets, [*sequential, "AoDE"])),
        _claim("AoDE forgets less than every single-domain fine-tune",
               [ev.less(forgets["AoDE"], forgets[f"FT {d}"]) for d in TARGETS],
               _points(forgets, ["AoDE", *(f"FT {d}" for d in TARGETS)])),
        _claim("AoDE with the original forgets least of the merges",
               [ev.less(forgets["AoDE with orig"], forgets[n]) for n in merges],
               _points(forgets, ["AoDE with orig", *merges])),
        _claim(f"up-weighting {upweighted} moves its WER toward its expert's",
               [ev.less(ev.wer(f"AoDE {upweighted} x4", upweighted), ev.wer("AoDE", upweighted))],
               {n: rows[n]["wer"][upweighted] for n in ["AoDE", f"AoDE {upweighted} x4", f"FT {upweighted}"]}),
    ]
    if flat_name(TARGETS[0]) in rows:
        pairs = [(f"FT {d}", flat_name(d)) for d in TARGETS]
        claims.append(_claim("LLRD makes every single-domain fine-tune forget less",
                             [ev.less(forgets[llrd], forgets[flat]) for llrd, flat in pairs],
                             _points(forgets, [n for pair in pairs for n in pair])))
    if round_name("AoDE", ROUNDS) in rows:
        claims += iterative_claims(ev, forgets)
    if "sequential editing TA" in rows:
        claims += editing_claims(ev, forgets, sequential[0])
    if f"MAcT {upweighted}" in rows:
        claims += trajectory_claims(ev, upweighted)
    if SEARCH_ROW in rows:
        claims += search_claims(ev, forgets, upweighted)
    return claims


def _points(quantities: Mapping[str, Quantity], names: Sequence[str]) -> dict[str, float]:
    return {n: quantities[n].point for n in names}


def _target_points(ev: Evidence, names: Sequence[str]) -> dict[str, float]:
    return {n: round(ev.target_wer(n).point, 2) for n in names}


def iterative_claims(ev: Evidence, forgets: Mapping[str, Quantity]) -> list[dict[str, Any]]:
    rounds = [round_name("AoDE", k) for k in range(1, ROUNDS + 1)]
    last_round, last_round_orig = round_name("AoDE", ROUNDS), round_name("AoDE with orig", ROUNDS)
    return [
        _claim("iterating AoDE lowers the target domains' average WER round after round",
               [ev.less(ev.target_wer(b), ev.target_wer(a)) for a, b in zip(rounds, rounds[1:])],
               _target_points(ev, rounds)),
        _claim(f"the original in round {ROUNDS}'s average reduces its forgetting",
               [ev.less(forgets[last_round_orig], forgets[last_round])],
               _points(forgets, [last_round, last_round_orig])),
    ]


def editing_claims(ev: Evidence, forgets: Mapping[str, Quantity], sequential: str) -> list[dict[str, Any]]:
    editing = [f"sequential editing {label}" for label in EDITS]
    return [
        _claim("sequential editing forgets less than sequential fine-tuning (same order)",
               [ev.less(forgets[e], forgets[sequential]) for e in editing], _points(forgets, [sequential, *editing])),
        _claim("TIES editing beats task-arithmetic editing on the target domains",
               [ev.less(ev.target_wer(editing[1]), ev.target_wer(editing[0]))], _target_points(ev, editing)),
    ]


def trajectory_claims(ev: Evidence, upweighted: str) -> list[dict[str, Any]]:
    names = (f"FT {upweighted}", *(f"{m} {upweighted}" for m in ("MAST", "MAcT", "SMAcT")))
    focus = {n: ev.wer(n, upweighted) for n in names}
    return [
        _claim(f"MAST, MAcT and SMAcT each beat plain fine-tuning on {upweighted}",
               [ev.less(focus[n], focus[names[0]]) for n in names[1:]], _points(focus, names)),
        _claim(f"SMAcT is at least as good as MAcT on {upweighted}",
               [ev.less(focus[names[3]], focus[names[2]])], _points(focus, names[2:])),
    ]


def search_claims(ev: Evidence, forgets: Mapping[str, Quantity], upweighted: str) -> list[dict[str, Any]]:
    """The forgetting-budget search, on the test sets it never saw: within its budget, and
    better on the target domains than every fixed recipe of the same experts within it
    (within by its measured Forgetting %)."""
    fixed = [n for n in ("AoDE", "AoDE with orig", f"AoDE {upweighted} x4", "original x4", "TIES", "task arithmetic")
             if n in ev.rows]
    within = [n for n in fixed if forgets[n].point <= SEARCH_BUDGET]
    return [
        _claim(f"the search keeps within its {SEARCH_BUDGET:g}% forgetting budget on test",
               [ev.less(forgets[SEARCH_ROW], constant(SEARCH_BUDGET))], _points(forgets, [SEARCH_ROW])),
        _claim(f"the search beats every fixed recipe within {SEARCH_BUDGET:g}% forgetting on the target domains",
               [ev.less(ev.target_wer(SEARCH_ROW), ev.target_wer(n)) for n in within],
               _target_points(ev, [SEARCH_ROW, *within])),
    ]
