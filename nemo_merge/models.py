"""Small real NeMo models: a SentencePiece tokenizer trained locally and an ASR model built from a config.

These are the building blocks of the adapter's tests and CPU experiments: the same
classes, state-dict names and ``.nemo`` layout as the released checkpoints (e.g.
``nvidia/parakeet-ctc-1.1b``), at a size that trains in seconds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

DEFAULT_TARGET = "nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE"
DATASET_KEYS = ("train_ds", "validation_ds", "test_ds")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.vocab", "vocab.txt")


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int,
    tokenizer_type: str = "bpe",
    lower_case: bool = True,
    seed: int = 0,
) -> Path:
    """Train a SentencePiece tokenizer on ``texts`` (one sentence each) into ``out_dir``.

    Uses NeMo's own ``create_spt_model``, as ``scripts/tokenizers/process_asr_text_tokenizer.py``
    does, so ``out_dir`` holds ``tokenizer.model``, ``tokenizer.vocab`` and ``vocab.txt``
    and can be a model's ``tokenizer.dir`` (with ``tokenizer.type: bpe``, whichever
    SentencePiece ``tokenizer_type``: ``bpe``, ``unigram``, ``char``, ``word``).
    ``vocab_size`` is an upper bound: a corpus too small for it gives fewer pieces.
    Returns ``out_dir``.
    """
    import sentencepiece
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    out_dir = Path(out_dir).resolve()
    # create_spt_model silently returns an existing tokenizer.model, whatever the texts
    if (out_dir / "tokenizer.model").exists():
        raise FileExistsError(f"{out_dir} already holds a tokenizer.model; pass an empty folder")
    lines = [line.strip() for line in texts if line.strip()]
    if not lines:
        raise ValueError("train_tokenizer: no non-empty text")
    out_dir.mkdir(parents=True, exist_ok=True)
    # SentencePiece shuffles its input with a random seed unless given one
    sentencepiece.set_random_generator_seed(seed)
    with tempfile.TemporaryDirectory(prefix="spt-") as tmp:
        corpus = Path(tmp) / "text.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        create_spt_model(
            data_file=str(corpus),
            vocab_size=vocab_size,
            sample_size=-1,
            do_lower_case=lower_case,
            tokenizer_type=tokenizer_type,
            output_dir=str(out_dir),
        )
    missing = [name for name in TOKENIZER_FILES if not (out_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"create_spt_model wrote no {', '.join(missing)} in {out_dir}")
    return out_dir


def load_model_config(config: str | Path | DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """The model section of a NeMo config with ``key=value`` overrides applied.

    ``config`` is a training config (``name``/``model``/``trainer``/...; overrides then
    start with ``model.``, as on NeMo's command line) or a bare model config such as a
    ``.nemo``'s ``model_config.yaml``. Interpolations are resolved after the overrides,
    so ``model.encoder.d_model=64`` also changes ``decoder.feat_in: ${model.encoder.d_model}``;
    the section returned no longer depends on its parent.
    """
    if isinstance(config, (str, Path)):
        cfg = OmegaConf.load(config)
    elif config._get_parent() is not None:
        # a section of a larger config (``full.model``): its interpolations point into the
        # parent, which overrides cannot reach, so freeze them before detaching it
        cfg = OmegaConf.create(OmegaConf.to_container(config, resolve=True))
    else:
        cfg = config.copy()
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    OmegaConf.resolve(cfg)
    section = cfg.model if "model" in cfg else cfg
    return OmegaConf.create(OmegaConf.to_container(section))  # detached: no trainer/exp_manager parent


def build_model(
    config: str | Path | DictConfig,
    tokenizer_dir: str | Path,
    overrides: Sequence[str] = (),
    seed: int = 0,
):
    """A freshly initialized NeMo ASR model of the class the config names, without trainer or data.

    The class is the config's ``target`` (default ``EncDecCTCModelBPE``); ``tokenizer_dir``
    becomes ``tokenizer.dir``. Dataset manifests still ``???`` are set to ``None``, so
    NeMo skips their data loaders: call ``setup_training_data`` before training.
    Initialization draws from torch's RNG seeded with ``seed`` inside ``fork_rng``, so
    the caller's RNG state is left as it was. Returns a ``nemo.collections.asr.models.ASRModel``.
    """
    from nemo.utils.model_utils import import_class_by_path

    model_cfg = load_model_config(config, overrides)
    with open_dict(model_cfg):
        model_cfg.tokenizer.dir = str(Path(tokenizer_dir).resolve())
        _unset_missing_manifests(model_cfg)
    model_cls = import_class_by_path(model_cfg.get("target") or DEFAULT_TARGET)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(cfg=model_cfg, trainer=None)


def _unset_missing_manifests(model_cfg: DictConfig) -> None:
    """``manifest_filepath: ???`` -> ``None``: ModelPT's constructor sets up every dataset
    section it finds, and a missing value would raise there, while ``None`` is skipped."""
    for key in DATASET_KEYS:
        section = model_cfg.get(key)
        if section is not None and OmegaConf.is_missing(section, "manifest_filepath"):
            section.manifest_filepath = None
