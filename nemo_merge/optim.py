"""LLRD and the slanted triangular schedule for NeMo models, from config entries.

.. code-block:: yaml

    model:
      llrd: {decay: 0.9}        # layer_pattern defaults to ^encoder\\.layers\\.(\\d+)\\.
      optim:
        lr: 1e-4                # the top encoder layer's rate
        sched: {name: SlantedTriangular, cut_frac: 0.1, ratio: 32}

``llrd`` sits beside ``optim`` (like NeMo's own ``optim_param_groups``), not inside
it: NeMo's ``setup_optimization`` passes every unknown ``optim`` key to the
optimizer's constructor. Importing this module registers ``SlantedTriangular`` with
NeMo's scheduler registry (``register_scheduler``); NeMo fills in ``max_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType
from typing import Any

from nemo.core.config.schedulers import SchedulerParams
from nemo.core.optim.lr_scheduler import AVAILABLE_SCHEDULERS, register_scheduler
from omegaconf import DictConfig, OmegaConf
from torch.optim import Optimizer

from merge_core.training.llrd import LLRDSettings
from merge_core.training.stlr import SlantedTriangularLR

LLRD_KEY = "llrd"
NEMO_LAYER_PATTERN = r"^encoder\.layers\.(\d+)\."
SCHEDULER_NAME = "SlantedTriangular"


@dataclass
class SlantedTriangularParams(SchedulerParams):
    """``optim.sched`` keys of ``SlantedTriangular`` besides ``name`` and NeMo's ``max_steps``."""

    cut_frac: float = 0.1
    ratio: float = 32.0


def register_slanted_triangular() -> None:
    """Make ``optim.sched.name: SlantedTriangular`` resolve to :class:`SlantedTriangularLR`."""
    if SCHEDULER_NAME not in AVAILABLE_SCHEDULERS:
        register_scheduler(SCHEDULER_NAME, SlantedTriangularLR, SlantedTriangularParams)


register_slanted_triangular()


def llrd_settings(model_cfg: DictConfig) -> LLRDSettings | None:
    """The validated ``model.llrd`` section, or None when the config has none."""
    section = model_cfg.get(LLRD_KEY)
    if section is None:
        return None
    return LLRDSettings.from_mapping(OmegaConf.to_container(section, resolve=True), NEMO_LAYER_PATTERN)


def _setup_llrd_param_groups(self: Any) -> None:
    """``ModelPT.setup_optimizer_param_groups`` with one group per encoder layer, at
    lr_i = optim.lr * decay^(N-i), and one for the rest at the lowest layer's rate."""
    self._optimizer_param_groups = llrd_settings(self.cfg).param_groups(self, lr_top=float(self.cfg.optim.lr))


def install_llrd(model: Any) -> bool:
    """Give ``model`` LLRD parameter groups if its config has ``llrd``.

    NeMo's ``setup_optimization`` (called by ``configure_optimizers``) builds the
    optimizer over whatever ``setup_optimizer_param_groups`` leaves in
    ``_optimizer_param_groups``; NeMo documents overriding that method for per-layer
    rates. A user's script builds NeMo's own model class, so the override is bound to
    this instance instead of a subclass.

    Parameters
    ----------
    model : nemo.core.ModelPT
        The model to fine-tune; ``model.cfg.optim.lr`` is the top layer's rate.

    Returns
    -------
    bool
        True when LLRD was installed.
    """
    if llrd_settings(model.cfg) is None:
        return False
    model.setup_optimizer_param_groups = MethodType(_setup_llrd_param_groups, model)
    return True


def param_group_summary(optimizer: Optimizer) -> list[str]:
    """One line per optimizer group: its name, peak rate, current rate, parameter count."""
    lines = []
    for i, group in enumerate(optimizer.param_groups):
        count = sum(p.numel() for p in group["params"])
        peak = group.get("initial_lr", group["lr"])
        lines.append(f"{group.get('name', f'group {i}')}: lr {peak:.6g} (now {group['lr']:.6g}), {count} parameters")
    return lines
