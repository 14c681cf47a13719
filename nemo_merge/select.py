"""The NeMo dev evaluator of greedy soups (:mod:`merge_core.recipes.greedy_soup`) and forgetting-budget
searches (:mod:`merge_core.recipes.search`): one model restored from the template ``.nemo`` once,
its weights overwritten for every trial. A search scores several dev sets with that one model:
each set's evaluator is built with ``shared=`` the first one.

For CTC models the preprocessor's features are computed once, by the model's own
``transcribe`` (dither and padding as it sets them), and every trial runs only encoder,
decoder and decoding on them. That holds while the features cannot change: they are
recomputed whenever a trial's ``preprocessor.*`` tensors differ from the ones they were
computed with (a preprocessor with weights of its own, or candidates that disagree on
its buffers). Other model classes (RNNT, hybrid) are decoded by ``transcribe`` per trial.
"""

from __future__ import annotations

from typing import Mapping

import torch

from merge_core.checkpoint import CheckpointReader
from merge_core.errors import RecipeError
from merge_core.evaluation.runner import ModelSpec
from merge_core.evaluation.wer import WerStats, score
from merge_core.evaluation.manifests import Utterance, check_audio, read_nemo_manifest
from merge_core.recipes.greedy_soup import DevSet
from merge_core.selection import StateDict
from nemo_merge.evaluate import hypothesis_text, restore

OPTIONS = ("decoding",)
FRONTEND = "preprocessor."

Features = list[tuple[torch.Tensor, torch.Tensor]]


class NemoDevEvaluator:
    """``evaluate(state_dict) -> WER`` on a dev subset, for one restored NeMo model.

    ``shared``: an evaluator of another dev set whose restored model (and decoding
    settings) this one uses instead of restoring its own.
    """

    def __init__(self, template: CheckpointReader, dev: DevSet, shared: "NemoDevEvaluator | None" = None) -> None:
        from nemo.collections.asr.models import EncDecCTCModel
        from omegaconf import OmegaConf

        unknown = sorted(set(dev.options) - set(OPTIONS))
        if unknown:
            raise RecipeError(f"dev: unknown key(s) {unknown} for NeMo models; NeMo adds only: {', '.join(OPTIONS)}")
        self.utterances: list[Utterance] = dev.choose(read_nemo_manifest(dev.manifest))
        check_audio(self.utterances, dev.manifest)
        self.dev = dev
        if shared is not None:
            self.model = shared.model
        else:
            self.model = restore(ModelSpec(name="template", model=str(template.path)), dev.resolved_device())
            if dev.options.get("decoding") is not None:
                decoding = OmegaConf.merge(self.model.cfg.decoding, dict(dev.options["decoding"]))
                self.model.change_decoding_strategy(decoding)
        self.cached = isinstance(self.model, EncDecCTCModel)
        self.frontend: StateDict = {}
        self.features: Features = []
        if self.cached:
            self._compute_features()

    def _transcribe(self) -> list[str]:
        with torch.inference_mode():
            hypotheses = self.model.transcribe(
                [str(u.audio) for u in self.utterances], batch_size=self.dev.batch_size, num_workers=0, verbose=False
            )
        return [hypothesis_text(h) for h in hypotheses]

    def _compute_features(self) -> None:
        """Run ``transcribe`` once, keeping what the preprocessor returns for each batch."""
        features: Features = []
        hook = self.model.preprocessor.register_forward_hook(
            lambda module, inputs, output: features.append((output[0].clone(), output[1].clone()))
        )
        try:
            self._transcribe()
        finally:
            hook.remove()
            # transcribe's teardown unfreezes encoder and decoder, and NeMo's unfreeze puts
            # them in training mode, where batch norm would update its statistics every trial
            self.model.eval()
        self.features = features
        self.frontend = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k.startswith(FRONTEND)}

    def _frontend_changed(self, state: Mapping[str, torch.Tensor]) -> bool:
        return any(not torch.equal(state[k].to(v.device, v.dtype), v) for k, v in self.frontend.items() if k in state)

    def _decode_features(self) -> list[str]:
        texts = []
        with torch.inference_mode():
            for signal, length in self.features:
                log_probs, lengths, _ = self.model.forward(processed_signal=signal, processed_signal_length=length)
                hypotheses = self.model.decoding.ctc_decoder_predictions_tensor(log_probs, decoder_lengths=lengths)
                texts += [hypothesis_text(h) for h in hypotheses]
        return texts

    def stats(self, state: StateDict) -> WerStats:
        """The edit counts of the model with ``state``'s weights on this dev subset."""
        self.model.load_state_dict(state, strict=True)
        if not self.cached:
            hypotheses = self._transcribe()
        else:
            if self._frontend_changed(state):
                self._compute_features()
            hypotheses = self._decode_features()
        return score([u.text for u in self.utterances], hypotheses, self.dev.normalization, name=str(self.dev.manifest))

    def __call__(self, state: StateDict) -> float:
        return self.stats(state).wer

