"""Greedy selective merging: Algorithm 1 (SMAcT) of Ducorroy and Riad, "Robust fine-tuning
of speech recognition models via model merging: application to disordered speech", and
the greedy soup of Wortsman et al., "Model soups".

Candidates (checkpoints fine-tuned from one generalist) are tried one at a time: the
uniform average of the kept set plus the candidate is scored (a dev WER), and the
candidate is kept only if the score strictly drops. ``order="by_dev_wer"`` first sorts
the candidates by their own score. The average is kept as a running sum
(:class:`RunningSoup`), so a trial costs one add and one divide per tensor; what a
score is, and how a trial's weights reach a model, is the caller's ``evaluate``
(:mod:`merge_core.recipes.greedy_soup` runs it on a toolkit's dev set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from merge_core.errors import EvaluationError, RecipeError

ORDERS = ("given", "by_dev_wer")

StateDict = dict[str, torch.Tensor]
Evaluate = Callable[[StateDict], float]


@dataclass(frozen=True)
class Trial:
    """One evaluation of the greedy loop: ``index`` 0 is the first candidate alone."""

    index: int
    candidate: str
    wer: float  # dev WER of the kept set plus this candidate, as a fraction
    kept: bool
    best_wer: float  # running best after this trial
    members: int  # size of the kept set after this trial


@dataclass
class Selection:
    """What :func:`greedy_select` chose: the kept candidates, every trial, the soup."""

    kept: list[str]
    trials: list[Trial]
    state: StateDict
    wer: float
    individual: dict[str, float] = field(default_factory=dict)  # by_dev_wer: each candidate alone


@dataclass
class RunningSoup:
    """The uniform average of a growing set, kept as a running sum.

    ``fixed`` tensors (integer buffers, excluded names) are taken from the template
    unchanged, never averaged; averaged ones are cast back to ``dtypes`` (the
    template's) as the engine does.
    """

    fixed: Mapping[str, torch.Tensor]
    dtypes: Mapping[str, torch.dtype]
    total: StateDict = field(default_factory=dict)
    count: int = 0

    def with_candidate(self, tensors: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
        """``(sum with the candidate, the model it averages to)``; the soup itself is
        unchanged until :meth:`keep` (inputs may be read-only memory maps)."""
        total = {n: t + self.total[n] for n, t in tensors.items()} if self.count else dict(tensors)
        merged = {n: (t / (self.count + 1)).to(self.dtypes[n]) for n, t in total.items()}
        return total, {**self.fixed, **merged}

    def keep(self, total: StateDict) -> None:
        """Adopt the sum returned by :meth:`with_candidate`."""
        self.total, self.count = total, self.count + 1


def _checked_wer(wer: float, candidate: str) -> float:
    if math.isnan(wer):
        raise EvaluationError(f"dev WER is NaN with {candidate}: the dev subset has no reference words")
    return wer


def greedy_select(
    candidates: Sequence[str],
    load: Callable[[str], Mapping[str, torch.Tensor]],
    evaluate: Evaluate,
    soup: RunningSoup,
    *,
    first_wer: float | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> Selection:
    """Ducorroy and Riad's Algorithm 1 (SMAcT) over ``candidates`` in the order given.

    .. code-block:: text

        Algorithm 1 Selective model merging algorithm (SMAcT)
        Require: Set of candidate models {M_0, M_1, ..., M_{n-1}}
        initial ensemble E = {M_0}, WER_prev = WER_{M_0}
        1: for M_i in {M_1, M_2, ..., M_{n-1}} do
        2:   if WER_{E u {M_i}} < WER_prev then
        3:     E = E u {M_i}
        4:     WER_prev = WER_{E u {M_i}}
        5:   end if
        6: end for
        7: return Final merged model W_E

    W_E is the uniform average of E's members. ``load(candidate)`` gives the averaged
    tensors of one candidate in the compute dtype (only one candidate is held at a
    time besides the running sum); ``evaluate(state_dict)`` its dev WER. ``first_wer``:
    M_0's WER when already known (``by_dev_wer`` measured it). ``on_trial`` sees each
    :class:`Trial` as it happens (logging, progress).
    """
    if not candidates:
        raise RecipeError("greedy selection needs at least one candidate")
    first = candidates[0]
    total, state = soup.with_candidate(load(first))
    soup.keep(total)
    best = _checked_wer(evaluate(state) if first_wer is None else first_wer, first)
    kept, trials = [first], [Trial(0, first, best, True, best, 1)]
    if on_trial:
        on_trial(trials[0])
    for index, candidate in enumerate(candidates[1:], start=1):
        total, trial_state = soup.with_candidate(load(candidate))
        wer = _checked_wer(evaluate(trial_state), candidate)
        keep = wer < best  # strictly: a tie would add a member without evidence that it helps
        if keep:
            soup.keep(total)
            kept.append(candidate)
            best, state = wer, trial_state
        trials.append(Trial(index, candidate, wer, keep, best, len(kept)))
        if on_trial:
            on_trial(trials[-1])
    return Selection(kept=kept, trials=trials, state=state, wer=best)


def individual_wers(
    candidates: Sequence[str], load: Callable[[str], Mapping[str, torch.Tensor]], evaluate: Evaluate, soup: RunningSoup
) -> dict[str, float]:
    """Each candidate's own dev WER (its "soup" of one)."""
    return {c: _checked_wer(evaluate(RunningSoup(soup.fixed, soup.dtypes).with_candidate(load(c))[1]), c) for c in candidates}


def sorted_by_wer(wers: Mapping[str, float]) -> list[str]:
    """Candidates by ascending dev WER; ties keep the given order (``sorted`` is stable)."""
    return sorted(wers, key=wers.__getitem__)


def select(
    candidates: Sequence[str],
    load: Callable[[str], Mapping[str, torch.Tensor]],
    evaluate: Evaluate,
    soup: RunningSoup,
    order: str = "given",
    on_trial: Callable[[Trial], None] | None = None,
) -> Selection:
    """Algorithm 1 over ``candidates`` in the given order, or (``by_dev_wer``) sorted
    by each one's own dev WER first, best first: Wortsman et al.'s greedy soup with
    Algorithm 1's strict-drop rule."""
    if order not in ORDERS:
        raise RecipeError(f"parameter 'order' must be one of {', '.join(ORDERS)}; got {order!r}")
    if order == "given":
        return greedy_select(candidates, load, evaluate, soup, on_trial=on_trial)
    wers = individual_wers(candidates, load, evaluate, soup)
    ranked = sorted_by_wer(wers)
    selection = greedy_select(ranked, load, evaluate, soup, first_wer=wers[ranked[0]], on_trial=on_trial)
    selection.individual = wers
    return selection


