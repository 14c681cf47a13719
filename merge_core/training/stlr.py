"""The slanted triangular learning-rate schedule (STLR) of Howard & Ruder (2018, ULMFiT).

The rate rises linearly for the first ``cut_frac`` of training, then falls linearly
to ``1/ratio`` of its peak. The AoDE paper (Plantinga et al., "Parameter Averaging Is All You Need to Prevent Forgetting",
Sec. III-A) peaks at 10-20 % of
training. Each optimizer group follows the schedule from its own peak rate, so the
ratios LLRD sets between groups hold at every step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from merge_core.errors import TrainingConfigError


def check_stlr_settings(max_steps: int, cut_frac: float, ratio: float) -> None:
    """Refuse settings for which the schedule is undefined."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise TrainingConfigError(f"sched.max_steps must be a positive integer, got {max_steps!r}")
    if not 0.0 <= cut_frac < 1.0:
        raise TrainingConfigError(f"sched.cut_frac must lie in [0, 1), got {cut_frac!r}")
    if not ratio >= 1.0:
        raise TrainingConfigError(f"sched.ratio must be >= 1, got {ratio!r}")


def slanted_triangular(step: int, max_steps: int, cut_frac: float = 0.1, ratio: float = 32.0) -> float:
    """The STLR multiplier of the peak learning rate at ``step`` (Howard & Ruder 2018, eq. 3).

    .. math::

        cut = \\lfloor T \\cdot cut\\_frac \\rfloor

        p = t / cut                                   \\quad \\text{if } t < cut

        p = 1 - \\frac{t - cut}{cut \\cdot (1/cut\\_frac - 1)} \\quad \\text{otherwise}

        \\eta_t = \\eta_{max} \\frac{1 + p \\, (ratio - 1)}{ratio}

    The denominator :math:`cut (1/cut\\_frac - 1)` is taken as :math:`T - cut`, which
    it equals whenever :math:`T \\cdot cut\\_frac` is a whole number, so the rate ends at
    exactly :math:`\\eta_{max}/ratio` at step T for any T (and for ``cut == 0``).
    Steps past T keep that floor.

    Parameters
    ----------
    step : int
        t, the number of optimizer steps taken (0 for the first step's rate).
    max_steps : int
        T, the total number of optimizer steps.
    cut_frac : float
        Fraction of the steps spent increasing the rate, in [0, 1).
    ratio : float
        How much smaller the lowest rate is than the peak, >= 1.

    Returns
    -------
    float
        :math:`\\eta_t / \\eta_{max}`, in [1/ratio, 1].
    """
    check_stlr_settings(max_steps, cut_frac, ratio)
    cut = math.floor(max_steps * cut_frac)
    if step < cut:
        p = step / cut
    else:
        p = max(0.0, 1.0 - (step - cut) / max(max_steps - cut, 1))
    return (1.0 + p * (ratio - 1.0)) / ratio


class SlantedTriangularLR(LRScheduler):
    """Applies :func:`slanted_triangular` to every parameter group's own peak rate.

    Group g's rate at step t is :math:`\\eta^{(g)}_t = \\eta^{(g)}_{max} \\, m(t)` with
    :math:`m` the STLR multiplier and :math:`\\eta^{(g)}_{max}` the group's ``lr`` when
    the scheduler was built, so the ratio between any two groups never changes.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Its groups' ``lr`` are the peak rates.
    max_steps : int
        T, the total number of optimizer steps.
    cut_frac : float
        Fraction of the steps spent increasing the rate (the paper: 0.1-0.2).
    ratio : float
        Peak rate / lowest rate (Howard & Ruder use 32).
    last_epoch : int
        The last step taken, -1 for a fresh schedule (torch's convention).
    """

    def __init__(
        self, optimizer: Optimizer, *, max_steps: int, cut_frac: float = 0.1, ratio: float = 32.0, last_epoch: int = -1
    ) -> None:
        check_stlr_settings(max_steps, cut_frac, ratio)
        self.max_steps = max_steps
        self.cut_frac = cut_frac
        self.ratio = ratio
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        multiplier = slanted_triangular(self.last_epoch, self.max_steps, self.cut_frac, self.ratio)
        return [base_lr * multiplier for base_lr in self.base_lrs]
