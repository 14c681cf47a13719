"""``save_to`` that writes plain weights, whoever calls it.

A model fine-tuned with LoRA (``model.lora``) or L-MAM (``model.lmam``) holds extra
modules and reparametrized tensors while it trains. Routing its ``save_to`` through
:class:`FoldingConnector` makes every ``.nemo`` it writes (our export callbacks,
``exp_manager``'s ``always_save_nemo``, EMA copies, the user's own call) hold the
folded weights under the base model's keys, restorable by an unmodified NeMo.
Lightning ``.ckpt`` files keep the training-time form, so training resumes from them.
"""

from __future__ import annotations

from typing import Any

from nemo.core.connectors.save_restore_connector import SaveRestoreConnector

from merge_core.errors import TrainingConfigError
from merge_core.training.folding import plain_weights


class FoldingConnector(SaveRestoreConnector):
    """NeMo's ``SaveRestoreConnector`` whose ``save_to`` writes the folded model."""

    def save_to(self, model: Any, save_path: str) -> Any:
        with plain_weights(model):
            return super().save_to(model, save_path)


def use_folding_connector(model: Any, section: str) -> None:
    """Route ``model.save_to`` through :class:`FoldingConnector`, keeping the current
    connector's settings. NeMo selects the connector per instance (``restore_from`` sets
    ``_save_restore_connector``); models with their own connector class are refused,
    naming the config ``section`` that needs folding."""
    current = model._save_restore_connector
    if isinstance(current, FoldingConnector):
        return
    if type(current) is not SaveRestoreConnector:
        raise TrainingConfigError(
            f"model.{section}: {type(model).__name__} saves through {type(current).__name__}; "
            "folding on save supports NeMo's default SaveRestoreConnector only"
        )
    connector = FoldingConnector()
    connector.__dict__.update(current.__dict__)
    model._save_restore_connector = connector
