"""``asr-merge grams`` for NeMo: an expert's Gram file for ``method: regmean``.

.. code-block:: yaml

    toolkit: nemo
    model: experts/noisy.nemo          # or pretrained_name: (then output: is required)
    manifest: data/noisy/train.json    # the expert's own training manifest (JSONL)
    batch_size: 8
    batches: 20                        # or max_utterances; default: the whole manifest
    device: auto

The expert is restored as ``asr-merge eval`` restores it and run by its own
``transcribe`` (NeMo's audio loading, resampling, batching and padding, the model's own
``forward``) on the manifest's first utterances, with :class:`merge_core.grams.GramCollector`
hooked on its linear layers. Padded frames are told by the lengths the model's modules
return: the preprocessor's, the encoder's subsampling's (``pre_encode``) and the
encoder's. A CTC model's ``forward`` runs preprocessor, encoder and decoder, so every
layer gets a Gram; an RNNT model's decoder and joint need transcripts to run and get none
(a merge averages them). The file goes beside the ``.nemo``
(:func:`merge_core.grams.gram_path`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from omegaconf import DictConfig

from merge_core.evaluation.manifests import check_audio, read_nemo_manifest
from merge_core.evaluation.runner import ModelSpec
from merge_core.grams import GramCollector, GramConfig, linear_layers, write_grams
from nemo_merge.evaluate import restore

# modules whose output is (tensor, lengths), each with the tensor's time axis
LENGTH_SOURCES = (("preprocessor", -1), ("encoder.pre_encode", 1), ("encoder", -1))

Hook = Callable[..., None]


def reports_lengths(collector: GramCollector, axis: int) -> Hook:
    """A forward hook passing a module's ``(tensor, lengths)`` output to ``collector``."""

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, tuple) and len(output) >= 2 and all(torch.is_tensor(o) for o in output[:2]):
            collector.report_lengths(output[0].shape[axis], output[1])

    return hook


def starts_batches(collector: GramCollector) -> Hook:
    """A forward pre-hook of the preprocessor, the first module of every batch, starting it."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        signal = kwargs.get("input_signal", args[0] if args else None)
        collector.start_batch(signal.shape[0])

    return hook


def model_weights(config: GramConfig) -> tuple[ModelSpec, Path]:
    """The model to restore and the checkpoint file whose digest the Gram file records."""
    if config.model is not None:
        return ModelSpec(name="expert", model=str(config.model)), config.model
    from nemo.collections.asr.models import ASRModel

    cached = ASRModel.from_pretrained(config.pretrained_name, return_model_file=True)
    return ModelSpec(name="expert", pretrained_name=config.pretrained_name), Path(cached)


def collect_grams(config: Mapping[str, Any] | DictConfig, progress: bool = True) -> Path:
    """Collect and write an expert's Gram file as ``config`` says (module docstring); returns its path."""
    config, _ = GramConfig.from_mapping(config)
    utterances = config.choose(read_nemo_manifest(config.manifest))
    check_audio(utterances, config.manifest)
    spec, weights = model_weights(config)
    model = restore(spec, config.resolved_device())
    collector = GramCollector(linear_layers(model))
    modules = dict(model.named_modules())
    handles = [model.preprocessor.register_forward_pre_hook(starts_batches(collector), with_kwargs=True)]
    handles += [
        modules[n].register_forward_hook(reports_lengths(collector, axis)) for n, axis in LENGTH_SOURCES if n in modules
    ]
    try:
        with collector, torch.inference_mode():
            model.transcribe(
                [str(u.audio) for u in utterances], batch_size=config.batch_size, num_workers=0, verbose=progress
            )
    finally:
        for handle in handles:
            handle.remove()
    return write_grams(config, collector.finish(), weights)
