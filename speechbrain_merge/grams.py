"""``asr-merge grams`` for SpeechBrain: an expert's Gram file for ``method: regmean``.

.. code-block:: yaml

    toolkit: speechbrain
    model: results/noisy/save/CKPT+expert      # the expert's checkpoint folder
    manifest: data/noisy/train.csv             # its own training CSV
    hparams: configs/speechbrain/tiny_ctc_inference.yaml
    hparams_overrides: {tokenizer_file: results/tiny/tokenizer/40_unigram.model}
    data_root: data                            # $data_root in the CSV's wav column
    batch_size: 8
    batches: 20                                # or max_utterances; default: the whole CSV

The checkpoint is built into the ``speechbrain.inference`` interface exactly as ``asr-merge
eval`` builds it (``hparams``, ``hparams_overrides``, ``interface``: ``EncoderASR`` or
``EncoderDecoderASR``), the CSV's first utterances are loaded and padded as the
evaluation pads them, and each batch runs the interface's own ``encode_batch`` with
:class:`merge_core.grams.GramCollector` hooked on the linear layers of the checkpoint's
tensor recoverables (``model.2.w.weight``: the checkpoint's own names). Padded frames
are told by the batch's relative lengths, rounded on each time axis as SpeechBrain's own
masks round them. A seq2seq decoder runs on hypotheses, not in ``encode_batch``: it gets
no Gram and a merge averages it. Linear maps that are bare parameters rather than
modules (``RelPosMHAXL.in_proj_weight``) have no hook, hence no Gram, and are averaged
too. The file goes beside the ``CKPT+`` folder (:func:`merge_core.grams.gram_path`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from merge_core.errors import RecipeError
from merge_core.evaluation.manifests import check_audio
from merge_core.evaluation.runner import ModelSpec
from merge_core.grams import GramCollector, GramConfig, linear_layers, write_grams
from speechbrain_merge.checkpoint_io import CheckpointerFolderReader
from speechbrain_merge.evaluate import (
    SpeechBrainBackend,
    SpeechBrainOptions,
    checkpoint_folder,
    load_interface,
    padded_batch,
)

INTERFACES = ("EncoderASR", "EncoderDecoderASR")  # Whisper's encoder sees 30-s windows: no lengths to mask by


def speechbrain_options(raw: Mapping[str, Any]) -> SpeechBrainOptions:
    """The SpeechBrain keys of a Gram config: ``hparams`` required, an encoder interface."""
    options = SpeechBrainOptions.from_mapping(raw)
    if options.hparams is None:
        raise RecipeError(
            "Gram config key 'hparams' is required: the inference HyperPyYAML the checkpoint is built with"
        )
    if options.interface not in INTERFACES or options.encoder_states_dir is not None:
        raise RecipeError(
            f"Gram config key 'interface' must be one of {', '.join(INTERFACES)}, got {options.interface!r}"
        )
    return options


def collect_grams(config: Mapping[str, Any] | DictConfig, progress: bool = True) -> Path:
    """Collect and write an expert's Gram file as ``config`` says (module docstring); returns its path."""
    config, keys = GramConfig.from_mapping(config, toolkit_keys=list(SpeechBrainOptions.__dataclass_fields__))
    if config.pretrained_name is not None:
        raise RecipeError(
            "Gram config key 'pretrained_name' is NeMo's: give the SpeechBrain expert's CKPT+ folder as 'model'"
        )
    options = speechbrain_options(keys)
    spec = ModelSpec(name="expert", model=str(config.model))
    with CheckpointerFolderReader(checkpoint_folder(spec)) as reader:
        recoverables = list(reader.merged)
    with tempfile.TemporaryDirectory(prefix="asr-merge-grams-") as work:
        backend = SpeechBrainBackend(options, Path(work))
        utterances = config.choose(backend.read_manifest(config.manifest))
        check_audio(utterances, config.manifest)
        asr = load_interface(spec, options, Path(work), config.resolved_device())
        layers = {}
        for recoverable in recoverables:
            layers |= linear_layers(asr.hparams.pretrainer.loadables[recoverable], prefix=f"{recoverable}.")
        with GramCollector(layers) as collector, torch.no_grad():
            for start in tqdm(
                range(0, len(utterances), config.batch_size), desc="grams", unit="batch", disable=not progress
            ):
                wavs, lengths = padded_batch(asr, utterances[start : start + config.batch_size])
                collector.start_batch(wavs.shape[0], relative=lengths)
                asr.encode_batch(wavs, lengths)
    extra = {
        "hparams": str(options.hparams),
        "hparams_overrides": dict(options.hparams_overrides),
        "interface": options.interface,
    }
    return write_grams(config, collector.finish(), config.model, extra)
