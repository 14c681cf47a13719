"""The papers' findings checked against a demo's report."""

from __future__ import annotations

from typing import Any

from merge_core.app.demo.plan import TARGETS
from merge_core.app.demo.scenarios import EDITS, ROUNDS, SEARCH_BUDGET, SEARCH_ROW, round_name

def flat_name(domain: str) -> str:
    """The row of ``domain``'s fine-tune without LLRD."""
    return f"FT {domain} without LLRD"


def _target_average(row: dict[str, Any]) -> float:
    """Mean WER over the target domains' test sets."""
    return sum(row["wer"][d] for d in TARGETS) / len(TARGETS)


def _claim(claim: str, holds: bool, numbers: dict[str, Any]) -> dict[str, Any]:
    return {"claim": claim, "holds": holds, "numbers": numbers}


def check_claims(report: dict[str, Any], upweighted: str) -> list[dict[str, Any]]:
    """Seeds 000, 002 and 004's findings, each with whether it holds here and the numbers
    it rests on; a finding is checked when the report has its rows."""
    rows = {m["name"]: m for m in report["models"]}
    forgets = {name: m["forgetting_pct"] or 0.0 for name, m in rows.items()}
    single = {d: rows[f"FT {d}"] for d in TARGETS}
    sequential = [n for n in rows if n.startswith("sequential ") and not n.startswith("sequential editing")]
    merges = [n for n in ("AoDE", "AoDE LoRA", f"AoDE {upweighted} x4", "TIES", "task arithmetic") if n in rows]
    claims = [
        _claim(f"fine-tuning on {d} improves {d} and forgets",
               m["wer"][d] < rows["pretrained"]["wer"][d] and forgets[m["name"]] > 0,
               {"wer_before": rows["pretrained"]["wer"][d], "wer_after": m["wer"][d], "forgetting_pct": forgets[m["name"]]})
        for d, m in single.items()
    ]
    claims += [
        _claim("sequential fine-tuning forgets more than AoDE",
               all(forgets[s] > forgets["AoDE"] for s in sequential), {n: forgets[n] for n in [*sequential, "AoDE"]}),
        _claim("AoDE forgets less than every single-domain fine-tune",
               all(forgets["AoDE"] < forgets[f"FT {d}"] for d in TARGETS),
               {n: forgets[n] for n in ["AoDE", *(f"FT {d}" for d in TARGETS)]}),
        _claim("AoDE with the original forgets least of the merges",
               all(forgets["AoDE with orig"] <= forgets[n] for n in merges),
               {n: forgets[n] for n in ["AoDE with orig", *merges]}),
        _claim(f"up-weighting {upweighted} moves its WER toward its expert's",
               rows[f"AoDE {upweighted} x4"]["wer"][upweighted] < rows["AoDE"]["wer"][upweighted],
               {n: rows[n]["wer"][upweighted] for n in ["AoDE", f"AoDE {upweighted} x4", f"FT {upweighted}"]}),
    ]
    if flat_name(TARGETS[0]) in rows:
        pairs = [(f"FT {d}", flat_name(d)) for d in TARGETS]
        claims.append(_claim("LLRD makes every single-domain fine-tune forget less",
                             all(forgets[llrd] < forgets[flat] for llrd, flat in pairs),
                             {n: forgets[n] for pair in pairs for n in pair}))
    if round_name("AoDE", ROUNDS) in rows:
        claims += iterative_claims(rows, forgets)
    if "sequential editing TA" in rows:
        claims += editing_claims(rows, forgets, sequential[0])
    if f"MAcT {upweighted}" in rows:
        claims += trajectory_claims(rows, upweighted)
    if SEARCH_ROW in rows:
        claims += search_claims(rows, forgets, upweighted)
    return claims


def iterative_claims(rows: dict[str, Any], forgets: dict[str, float]) -> list[dict[str, Any]]:
    rounds = [round_name("AoDE", k) for k in range(1, ROUNDS + 1)]
    last_round, last_round_orig = round_name("AoDE", ROUNDS), round_name("AoDE with orig", ROUNDS)
    return [
        _claim("iterating AoDE lowers the target domains' average WER round after round",
               all(_target_average(rows[a]) > _target_average(rows[b]) for a, b in zip(rounds, rounds[1:])),
               {n: round(_target_average(rows[n]), 2) for n in rounds}),
        _claim(f"the original in round {ROUNDS}'s average reduces its forgetting",
               forgets[last_round_orig] < forgets[last_round], {n: forgets[n] for n in (last_round, last_round_orig)}),
    ]


def editing_claims(rows: dict[str, Any], forgets: dict[str, float], sequential: str) -> list[dict[str, Any]]:
    editing = [f"sequential editing {label}" for label in EDITS]
    return [
        _claim("sequential editing forgets less than sequential fine-tuning (same order)",
               all(forgets[e] < forgets[sequential] for e in editing), {n: forgets[n] for n in [sequential, *editing]}),
        _claim("TIES editing beats task-arithmetic editing on the target domains",
               _target_average(rows[editing[1]]) < _target_average(rows[editing[0]]),
               {n: round(_target_average(rows[n]), 2) for n in editing}),
    ]


def trajectory_claims(rows: dict[str, Any], upweighted: str) -> list[dict[str, Any]]:
    names = (f"FT {upweighted}", *(f"{m} {upweighted}" for m in ("MAST", "MAcT", "SMAcT")))
    focus = {n: rows[n]["wer"][upweighted] for n in names}
    return [
        _claim(f"MAST, MAcT and SMAcT each beat plain fine-tuning on {upweighted}",
               all(wer < focus[names[0]] for n, wer in focus.items() if n != names[0]), focus),
        _claim(f"SMAcT is at least as good as MAcT on {upweighted}",
               focus[names[3]] <= focus[names[2]], {n: focus[n] for n in names[2:]}),
    ]


def search_claims(rows: dict[str, Any], forgets: dict[str, float], upweighted: str) -> list[dict[str, Any]]:
    """The forgetting-budget search, on the test sets it never saw: within its budget, and
    better on the target domains than every fixed recipe of the same experts within it."""
    fixed = [n for n in ("AoDE", "AoDE with orig", f"AoDE {upweighted} x4", "original x4", "TIES", "task arithmetic")
             if n in rows]
    within = [n for n in fixed if forgets[n] <= SEARCH_BUDGET]
    return [
        _claim(f"the search keeps within its {SEARCH_BUDGET:g}% forgetting budget on test",
               forgets[SEARCH_ROW] <= SEARCH_BUDGET, {SEARCH_ROW: forgets[SEARCH_ROW]}),
        _claim(f"the search beats every fixed recipe within {SEARCH_BUDGET:g}% forgetting on the target domains",
               all(_target_average(rows[SEARCH_ROW]) < _target_average(rows[n]) for n in within),
               {n: round(_target_average(rows[n]), 2) for n in [SEARCH_ROW, *within]}),
    ]
