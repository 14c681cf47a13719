"""LoRA for NeMo ASR models from a ``model.lora`` config section.

.. code-block:: yaml

    model:
      lora:
        r: 16             # the paper: 16 or 32
        alpha: null       # default 2r, the paper's scale
        dropout: 0.0
        target_modules: [linear_q, linear_k, linear_v, linear_out, linear1, linear2,
                         pointwise_conv1, pointwise_conv2, depthwise_conv]

The default targets are the Conformer layers' attention and feed-forward linears and
the convolution module's pointwise and depthwise convolutions. The model's
``save_to`` then writes LoRA folded into the weights (a plain ``.nemo`` with exactly
the base's keys), whoever calls it: our export callback, ``exp_manager``'s
checkpointing (``always_save_nemo``, EMA copies) or the user. Lightning ``.ckpt``
files keep the LoRA layers, so training resumes from them.
"""

from __future__ import annotations

from typing import Any

from nemo.core.connectors.save_restore_connector import SaveRestoreConnector
from omegaconf import DictConfig, OmegaConf

from merge_core.errors import TrainingConfigError
from merge_core.training.lora import LoraSettings, apply_lora, has_lora, lora_folded

LORA_KEY = "lora"
NEMO_LORA_TARGETS = (
    "linear_q",
    "linear_k",
    "linear_v",
    "linear_out",
    "linear1",
    "linear2",
    "pointwise_conv1",
    "pointwise_conv2",
    "depthwise_conv",
)


def lora_settings(model_cfg: DictConfig) -> LoraSettings | None:
    """The validated ``model.lora`` section with NeMo's default targets, or None."""
    section = model_cfg.get(LORA_KEY)
    if section is None:
        return None
    return LoraSettings.from_mapping(
        {"target_modules": list(NEMO_LORA_TARGETS), **OmegaConf.to_container(section, resolve=True)}
    )


class LoraFoldingConnector(SaveRestoreConnector):
    """NeMo's ``SaveRestoreConnector`` whose ``save_to`` writes the LoRA-folded model."""

    def save_to(self, model: Any, save_path: str) -> Any:
        with lora_folded(model):
            return super().save_to(model, save_path)


def use_folding_connector(model: Any) -> None:
    """Route ``model.save_to`` through :class:`LoraFoldingConnector`, keeping the current
    connector's settings. NeMo selects the connector per instance (``restore_from`` sets
    ``_save_restore_connector``); models with their own connector class are refused."""
    current = model._save_restore_connector
    if isinstance(current, LoraFoldingConnector):
        return
    if type(current) is not SaveRestoreConnector:
        raise TrainingConfigError(
            f"model.lora: {type(model).__name__} saves through {type(current).__name__}; "
            "folding LoRA on save supports NeMo's default SaveRestoreConnector only"
        )
    connector = LoraFoldingConnector()
    connector.__dict__.update(current.__dict__)
    model._save_restore_connector = connector


def apply_lora_from_config(model: Any) -> bool:
    """Inject LoRA into ``model`` as ``model.cfg.lora`` says (once; a second call only
    checks) and make its ``save_to`` fold LoRA. Afterwards only LoRA parameters train.

    Parameters
    ----------
    model : nemo.core.ModelPT
        The model to fine-tune.

    Returns
    -------
    bool
        True when the model now holds LoRA layers.
    """
    settings = lora_settings(model.cfg)
    if settings is None:
        return False
    if not has_lora(model):
        apply_lora(model, settings)
    use_folding_connector(model)
    return True
