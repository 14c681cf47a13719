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
the base's keys), whoever calls it (:mod:`nemo_merge.folding`). Lightning ``.ckpt``
files keep the LoRA layers, so training resumes from them.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from merge_core.training.lora import LoraSettings, apply_lora, has_lora
from nemo_merge.folding import use_folding_connector

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
    use_folding_connector(model, LORA_KEY)
    return True
