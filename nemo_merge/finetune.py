"""Fine-tune a domain expert from a NeMo ASR generalist, ready for merging.

    python -m nemo_merge.finetune --config-path configs/nemo --config-name finetune_expert \\
        init_from_nemo_model=models/generalist.nemo \\
        model.train_ds.manifest_filepath=data/domain_train.json \\
        model.validation_ds.manifest_filepath=data/domain_dev.json

Modelled on NeMo's ``examples/asr/speech_to_text_finetune.py``: the generalist comes
from ``init_from_nemo_model`` (a ``.nemo``) or ``init_from_pretrained_model`` (an
NGC/Hugging Face name), the trainer from ``trainer`` (through
:func:`nemo_merge.callbacks.resolve_trainer_cfg`, which also accepts our callbacks),
logging and checkpoints from ``exp_manager``. On top of it, config entries alone turn
on LLRD (``model.llrd``), the slanted triangular schedule
(``model.optim.sched.name: SlantedTriangular``), LoRA (``model.lora``), L-MAM
(``model.lmam``: Sundar et al.'s learnable attention merging), the expert
export and trajectory snapshots (``trainer.callbacks``). The tokenizer is the
generalist's: experts with another vocabulary could not be averaged with it.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from nemo.collections.asr.models import ASRModel
from nemo.core.config import hydra_runner
from nemo.utils import logging
from nemo.utils.exp_manager import exp_manager
from omegaconf import DictConfig, OmegaConf, open_dict

from merge_core import MergeError
from merge_core.errors import TrainingConfigError
from nemo_merge.callbacks import ExpertSetup, resolve_trainer_cfg
from nemo_merge.hydra_args import config_path_from_cwd
from nemo_merge.lmam import LMAM_KEY
from nemo_merge.lora import LORA_KEY
from nemo_merge.optim import LLRD_KEY

# model sections copied from the fine-tuning config into the restored model's config
FINETUNE_SECTIONS = (LLRD_KEY, LORA_KEY, LMAM_KEY, "optim")


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    """The Lightning trainer of ``cfg.trainer``, with :class:`ExpertSetup` added when the
    config does not list it (this script's LoRA and LLRD entries need it)."""
    kwargs = resolve_trainer_cfg(cfg.trainer)
    callbacks = kwargs.setdefault("callbacks", [])
    if not any(isinstance(c, ExpertSetup) for c in callbacks):
        callbacks.insert(0, ExpertSetup())
    return pl.Trainer(**kwargs)


def check_generalist_source(cfg: DictConfig) -> None:
    """Exactly one of ``init_from_nemo_model`` and ``init_from_pretrained_model``."""
    if (cfg.get("init_from_nemo_model") is None) == (cfg.get("init_from_pretrained_model") is None):
        raise TrainingConfigError("set exactly one of init_from_nemo_model and init_from_pretrained_model")


def restore_generalist(cfg: DictConfig, trainer: pl.Trainer) -> ASRModel:
    """The model named by ``init_from_nemo_model`` or ``init_from_pretrained_model``,
    attached to ``trainer``. ``model_overrides`` (e.g. ``{encoder: {dropout: 0.05}}``)
    amends the ``.nemo``'s own config before the network is built (NeMo's
    ``override_config_path``): the keys that, unlike ``model.optim`` or the data,
    shape modules at construction."""
    overrides = cfg.get("model_overrides")
    if cfg.get("init_from_nemo_model") is not None:
        path = str(cfg.init_from_nemo_model)
        override_cfg = None
        if overrides is not None:
            override_cfg = OmegaConf.merge(ASRModel.restore_from(path, return_config=True), detached(overrides))
        model = ASRModel.restore_from(restore_path=path, override_config_path=override_cfg)
    else:
        if overrides is not None:
            raise TrainingConfigError("model_overrides needs init_from_nemo_model (a .nemo whose config they amend)")
        model = ASRModel.from_pretrained(model_name=cfg.init_from_pretrained_model)
    model.set_trainer(trainer)
    return model


def refuse_new_tokenizer(cfg: DictConfig) -> None:
    """NeMo's fine-tuning script can swap the vocabulary (``model.tokenizer.update_tokenizer``);
    an expert must keep the generalist's, or its decoder cannot be averaged with it."""
    if cfg.model.get("tokenizer", {}).get("update_tokenizer", False):
        raise TrainingConfigError("model.tokenizer.update_tokenizer: experts must keep the generalist's tokenizer")


def detached(section: DictConfig) -> DictConfig:
    """``section`` with its interpolations resolved against the whole config (``${model.sample_rate}``)
    and cut from it, so it can live in the model's own config."""
    return OmegaConf.create(OmegaConf.to_container(section, resolve=True))


def copy_finetune_sections(model: ASRModel, model_cfg: DictConfig) -> None:
    """Put ``llrd``, ``lora``, ``lmam`` and ``optim`` of the fine-tuning config into the model's
    config, where :class:`ExpertSetup` and NeMo's ``setup_optimization`` read them and
    the exported expert records them."""
    with open_dict(model.cfg):
        for key in FINETUNE_SECTIONS:
            if model_cfg.get(key) is not None:
                model.cfg[key] = detached(model_cfg[key])


def setup_data(model: ASRModel, model_cfg: DictConfig) -> None:
    """Training, validation and (when given) test data, as NeMo's script sets them up."""
    model.setup_training_data(detached(model_cfg.train_ds))
    if model_cfg.get("validation_ds") is not None and model_cfg.validation_ds.get("manifest_filepath"):
        model.setup_multiple_validation_data(detached(model_cfg.validation_ds))
    if model_cfg.get("test_ds") is not None and model_cfg.test_ds.get("manifest_filepath"):
        model.setup_multiple_test_data(detached(model_cfg.test_ds))


def setup_spec_augment(model: ASRModel, model_cfg: DictConfig) -> None:
    """Replace the generalist's SpecAugment when the config gives one, as NeMo's script does."""
    if model_cfg.get("spec_augment") is not None:
        model.spec_augment = ASRModel.from_config_dict(model_cfg.spec_augment)


def finetune(cfg: DictConfig) -> ASRModel:
    """Run one fine-tuning from a full config (``init_from_*``, ``model``, ``trainer``,
    ``exp_manager``) and return the trained model."""
    logging.info(f"Hydra config:\n{OmegaConf.to_yaml(cfg)}")
    check_generalist_source(cfg)
    refuse_new_tokenizer(cfg)
    trainer = build_trainer(cfg)
    exp_manager(trainer, cfg.get("exp_manager", None))
    model = restore_generalist(cfg, trainer)
    copy_finetune_sections(model, cfg.model)
    setup_data(model, cfg.model)
    setup_spec_augment(model, cfg.model)
    trainer.fit(model)
    return model


@hydra_runner(config_path="../configs/nemo", config_name="finetune_expert")
def main(cfg: DictConfig) -> None:
    try:
        finetune(cfg)
    except MergeError as e:
        logging.error(str(e))
        sys.exit(2)


if __name__ == "__main__":
    sys.argv = config_path_from_cwd(sys.argv)
    main()
