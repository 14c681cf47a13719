"""L-MAM (Sundar et al., Eq. 3) for NeMo Conformer models from a ``model.lmam`` config section.

.. code-block:: yaml

    model:
      lmam:
        source_model: bert/model.safetensors   # e.g. a Hugging Face BERT of the encoder's width
        name_map: bert_to_nemo_conformer         # the default; or {source_pattern: target_pattern}
        layers: null                             # all mapped layers, or e.g. [2, 3]
        init_lambda: 0.1                         # lambda's start, strictly inside (0, 1)

Each targeted ``self_attn.linear_{q,k,v}`` then trains as
``lambda_i W_source + (1 - lambda_i) W_model`` with lambda_i learned along with the model
and W_source frozen. ``save_to`` writes the folded weights (:mod:`nemo_merge.folding`),
so the exported expert is a plain ``.nemo`` with the generalist's keys.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from merge_core.errors import TrainingConfigError
from merge_core.attention.lmam import LmamSettings, apply_lmam_from_checkpoint, has_lmam, lmam_lambdas
from merge_core.training.lora import has_lora
from nemo_merge.folding import use_folding_connector
from nemo_merge.lora import LORA_KEY

LMAM_KEY = "lmam"
NEMO_NAME_MAP = "bert_to_nemo_conformer"


def lmam_settings(model_cfg: Any) -> LmamSettings | None:
    """The validated ``model.lmam`` section (name map default: BERT -> NeMo Conformer), or None."""
    section = model_cfg.get(LMAM_KEY)
    if section is None:
        return None
    return LmamSettings.from_mapping(OmegaConf.to_container(section, resolve=True), NEMO_NAME_MAP)


def apply_lmam_from_config(model: Any) -> bool:
    """Parametrize ``model``'s mapped attention as ``model.cfg.lmam`` says (once; a second
    call only checks) and make its ``save_to`` fold it. True when the model holds L-MAM.

    LoRA and L-MAM together are refused: LoRA freezes the very W_t that L-MAM interpolates.
    """
    settings = lmam_settings(model.cfg)
    if settings is None:
        return False
    if model.cfg.get(LORA_KEY) is not None or has_lora(model):
        raise TrainingConfigError(f"model.{LMAM_KEY} and model.{LORA_KEY} cannot be combined: LoRA freezes the attention L-MAM trains")
    if not has_lmam(model):
        apply_lmam_from_checkpoint(model, settings)
    use_folding_connector(model, LMAM_KEY)
    return True


def lmam_summary(model: Any) -> str:
    """The current lambda of each L-MAM layer, for the training log."""
    lambdas = lmam_lambdas(model)
    return ", ".join(f"{name}={value:.4f}" for name, value in lambdas.items())
