"""The SpeechBrain dev evaluator of greedy soups (:mod:`merge_core.recipes.greedy_soup`) and
forgetting-budget searches (:mod:`merge_core.recipes.search`): one ``speechbrain.inference``
interface built from the template ``CKPT+`` folder once (as ``asr-merge eval`` builds it:
``dev.hparams``, ``hparams_overrides``, ``interface``, ``data_root``), its recoverables'
weights overwritten for every trial. A search scores several dev sets with that one
interface: each set's evaluator is built with ``shared=`` the first one.

The dev waveforms are loaded and padded into batches once (the batches of ``asr-merge
eval`` with the same ``batch_size``); each trial runs ``transcribe_batch`` on them.
Recoverables that are not tensor state dicts (the normalizer's statistics) stay the
template's, as the written soup keeps them. For an ``EncoderASR`` whose encoder starts
with ``compute_features`` and ``normalize`` (no merged weight in either), their output is
computed once per batch, as the encoder itself computes it, and each trial runs the
encoder from there on (:class:`CachedFrontEnd`). For a ``WhisperASR`` with
``encoder_states_dir``, each trial takes the encoder outputs kept there for its encoder
(:class:`~speechbrain_merge.whisper.EncoderStates`, keyed by the encoder's weights): a
search over decoder-only experts runs the encoder once per utterance, not once per trial.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from merge_core.errors import EvaluationError, RecipeError
from merge_core.evaluation.runner import ModelSpec
from merge_core.evaluation.wer import WerStats, score
from merge_core.evaluation.manifests import check_audio, read_speechbrain_csv
from merge_core.recipes.greedy_soup import DevSet
from merge_core.selection import StateDict
from speechbrain_merge.checkpoint_io import CheckpointerFolderReader, without_prefix

Batches = list[tuple[torch.Tensor, torch.Tensor]]
FRONT_END = ("compute_features", "normalize")  # an EncoderASR encoder's first modules: features, their normalisation


class CachedFrontEnd(torch.nn.Module):
    """In the encoder's place of ``compute_features``: the normalised features of the batch
    being decoded, computed once (no trial changes them: neither module holds a merged weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.features: list[torch.Tensor] = []
        self.batch = 0

    def forward(self, wavs: torch.Tensor) -> torch.Tensor:
        return self.features[self.batch]


class AlreadyNormalized(torch.nn.Module):
    """In the encoder's place of ``normalize``: the cached features are normalised already."""

    def forward(self, x: torch.Tensor, **lengths: torch.Tensor) -> torch.Tensor:
        return x


FrontEnd = list[tuple[torch.nn.Module, "str | None"]]  # the replaced modules, each with its lengths argument


def install_cached_front_end(asr: object, interface: str, merged: list[torch.nn.Module]) -> tuple[CachedFrontEnd, FrontEnd] | None:
    """Put a :class:`CachedFrontEnd` in the encoder of ``asr`` where it can stand in for the
    feature modules; returns it and the modules it replaced, or None where it cannot."""
    from speechbrain.nnet.containers import LengthsCapableSequential

    encoder = getattr(asr.mods, "encoder", None)
    if interface != "EncoderASR" or not isinstance(encoder, LengthsCapableSequential):
        return None
    names = list(encoder.keys())
    if tuple(names[: len(FRONT_END)]) != FRONT_END:
        return None
    front = [encoder[name] for name in FRONT_END]
    if any(m is f for module in merged for m in module.modules() for f in front):
        return None  # a merged weight feeds the features: every trial has its own
    cached = CachedFrontEnd()
    encoder._modules[FRONT_END[0]], encoder._modules[FRONT_END[1]] = cached, AlreadyNormalized()
    return cached, list(zip(front, encoder.lengths_arg_names))


class SpeechBrainDevEvaluator:
    """``evaluate(state_dict) -> WER`` on a dev subset, for one SpeechBrain interface.

    ``shared``: an evaluator of another dev set whose interface this one uses instead
    of building its own (the toolkit keys of both dev sets are the same).
    """

    def __init__(
        self, template: CheckpointerFolderReader, dev: DevSet, shared: "SpeechBrainDevEvaluator | None" = None
    ) -> None:
        from speechbrain_merge.evaluate import SpeechBrainOptions, load_interface, padded_batch
        from speechbrain_merge.whisper import EncoderStates

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
        if shared is not None:
            self._workdir, self.asr, self.front_end = shared._workdir, shared.asr, shared.front_end
        else:
            self._workdir = tempfile.TemporaryDirectory(prefix="asr-merge-soup-")  # the interface's source links
            spec = ModelSpec(name="template", model=str(template.path))
            self.asr = load_interface(spec, options, Path(self._workdir.name), dev.resolved_device())
            merged = [self.asr.hparams.pretrainer.loadables[r] for r in self.recoverables]
            self.front_end = install_cached_front_end(self.asr, options.interface, merged)
        size = dev.batch_size
        self.utterances = [utterances[i : i + size] for i in range(0, len(utterances), size)]
        self.batches: Batches = [padded_batch(self.asr, batch) for batch in self.utterances]
        self.encoder_states = None if options.encoder_states_dir is None else EncoderStates(options.encoder_states_dir)
        self.features = [self._features(wavs, lengths) for wavs, lengths in self.batches] if self.front_end else []

    def _features(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """What the replaced feature modules give for one batch, run as the encoder runs them
        (``transcribe_batch``'s float input on the model's device, without gradients)."""
        x, lengths = wavs.float().to(self.asr.device), lengths.to(self.asr.device)
        with torch.no_grad():
            for module, lengths_arg in self.front_end[1]:
                x = module(x, **{lengths_arg: lengths}) if lengths_arg else module(x)
                x = x[0] if isinstance(x, tuple) else x
        return x

    def load(self, state: StateDict) -> None:
        """Each recoverable's module takes its own tensors (strictly: all of them)."""
        loadables = self.asr.hparams.pretrainer.loadables
        for recoverable, names in self.recoverables.items():
            tensors = without_prefix(f"{recoverable}.")({n: state[n] for n in names})
            loadables[recoverable].load_state_dict(tensors, strict=True)

    def stats(self, state: StateDict) -> WerStats:
        """The edit counts of the interface with ``state``'s weights on this dev subset."""
        self.load(state)
        if self.encoder_states is not None:
            return self._stats_from_stored_states()
        hypotheses = []
        for i, (wavs, lengths) in enumerate(self.batches):
            if self.front_end:  # this set's features of this batch, whichever set decoded last
                self.front_end[0].features, self.front_end[0].batch = self.features, i
            hypotheses += [str(w) for w in self.asr.transcribe_batch(wavs, lengths)[0]]
        return score(self.references, hypotheses, self.dev.normalization, name=str(self.dev.manifest))

    def _stats_from_stored_states(self) -> WerStats:
        from speechbrain_merge.evaluate import transcribe_whisper_batch

        hypotheses = [h for batch in self.utterances for h in transcribe_whisper_batch(self.asr, batch, self.encoder_states)]
        return score(self.references, hypotheses, self.dev.normalization, name=str(self.dev.manifest))

    def __call__(self, state: StateDict) -> float:
        return self.stats(state).wer
