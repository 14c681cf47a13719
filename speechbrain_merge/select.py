"""The SpeechBrain dev evaluator of greedy soups (:mod:`merge_core.recipes.greedy_soup`): one
``speechbrain.inference`` interface built from the template ``CKPT+`` folder once (as
``asr-merge eval`` builds it: ``dev.hparams``, ``hparams_overrides``, ``interface``,
``data_root``), its recoverables' weights overwritten for every trial.

The dev waveforms are loaded and padded into batches once (the batches of ``asr-merge
eval`` with the same ``batch_size``); each trial runs ``transcribe_batch`` on them.
Recoverables that are not tensor state dicts (the normalizer's statistics) stay the
template's, as the written soup keeps them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from merge_core.errors import EvaluationError, RecipeError
from merge_core.evaluation.runner import ModelSpec
from merge_core.evaluation.wer import score
from merge_core.evaluation.manifests import check_audio, read_speechbrain_csv
from merge_core.recipes.greedy_soup import DevSet
from merge_core.selection import StateDict
from speechbrain_merge.checkpoint_io import CheckpointerFolderReader, without_prefix

Batches = list[tuple[torch.Tensor, torch.Tensor]]


class SpeechBrainDevEvaluator:
    """``evaluate(state_dict) -> WER`` on a dev subset, for one SpeechBrain interface."""

    def __init__(self, template: CheckpointerFolderReader, dev: DevSet) -> None:
        from speechbrain_merge.evaluate import SpeechBrainOptions, load_interface, padded_batch

        try:
            options = SpeechBrainOptions.from_mapping(dev.options)
        except EvaluationError as e:
            raise RecipeError(f"dev: {e}") from None
        known = SpeechBrainOptions.__dataclass_fields__
        unknown = sorted(set(dev.options) - set(known))
        if unknown:
            raise RecipeError(f"dev: unknown key(s) {unknown} for SpeechBrain models; SpeechBrain adds only: {', '.join(known)}")
        if options.hparams is None:
            raise RecipeError("dev.hparams is required for SpeechBrain checkpoint folders (an inference HyperPyYAML)")
        replacements = {} if options.data_root is None else {"data_root": options.data_root}
        utterances = dev.choose(read_speechbrain_csv(dev.manifest, replacements))
        check_audio(utterances, dev.manifest)
        self.dev, self.references = dev, [u.text for u in utterances]
        self.recoverables = template.merged
        self._workdir = tempfile.TemporaryDirectory(prefix="asr-merge-soup-")  # the interface's source links
        spec = ModelSpec(name="template", model=str(template.path))
        self.asr = load_interface(spec, options, Path(self._workdir.name), dev.resolved_device())
        size = dev.batch_size
        self.batches: Batches = [padded_batch(self.asr, utterances[i : i + size]) for i in range(0, len(utterances), size)]

    def load(self, state: StateDict) -> None:
        """Each recoverable's module takes its own tensors (strictly: all of them)."""
        loadables = self.asr.hparams.pretrainer.loadables
        for recoverable, names in self.recoverables.items():
            tensors = without_prefix(f"{recoverable}.")({n: state[n] for n in names})
            loadables[recoverable].load_state_dict(tensors, strict=True)

    def __call__(self, state: StateDict) -> float:
        self.load(state)
        hypotheses = [str(w) for wavs, lengths in self.batches for w in self.asr.transcribe_batch(wavs, lengths)[0]]
        return score(self.references, hypotheses, self.dev.normalization, name="dev").wer
