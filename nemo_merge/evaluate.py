"""Forgetting evaluation of NeMo ASR models on NeMo manifests.

    python -m nemo_merge.evaluate --config-path configs/nemo --config-name eval \\
        models.1.model=outputs/aode.nemo output_dir=outputs/eval_aode

or ``asr-merge eval configs/nemo/eval.yaml [key=value ...]``. The config keys are
documented in :mod:`merge_core.evaluation.runner`. Models are ``.nemo`` files
(``model``) or NGC/Hugging Face names (``pretrained_name``), restored as whatever
``ASRModel`` class they are and decoded with their own batched ``transcribe``. Each set's
transcripts are written as NeMo's ``transcribe_speech.py`` writes them: the manifest's
entries, each with its ``pred_text``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from merge_core import MergeError
from merge_core.evaluation.runner import Backend, EvalConfig, ModelSpec, run_evaluation
from merge_core.evaluation.manifests import Utterance, read_nemo_manifest
from merge_core.evaluation.wer import WerStats
from merge_core.checkpoint.provenance import file_sha256
from nemo_merge.hydra_args import config_path_from_cwd


def restore(spec: ModelSpec, device: str) -> Any:
    """An ``ASRModel`` in eval mode from a ``.nemo`` path or a pretrained name."""
    from nemo.collections.asr.models import ASRModel

    if spec.model is not None:
        model = ASRModel.restore_from(str(spec.model), map_location=device)
    else:
        model = ASRModel.from_pretrained(spec.pretrained_name, map_location=device)
    return model.eval()


def hypothesis_text(hypothesis: Any) -> str:
    """``transcribe`` returns Hypothesis objects (NeMo >= 2) or strings (older releases)."""
    return hypothesis if isinstance(hypothesis, str) else hypothesis.text


class NemoBackend(Backend):
    toolkit = "nemo"
    transcript_suffix = ".json"

    def __init__(self) -> None:
        import nemo.collections.asr  # noqa: F401  (NeMo's loggers exist before the evaluation redirects them)

        self._loaded: dict[str, Any] = {}

    def read_manifest(self, path: Path) -> list[Utterance]:
        return read_nemo_manifest(path)

    def weights_digest(self, spec: ModelSpec) -> str:
        if spec.model is not None:
            return file_sha256(spec.model)
        return f"pretrained:{spec.pretrained_name}"

    def decoding_settings(self, config: EvalConfig) -> dict[str, Any]:
        import nemo

        return {"toolkit": "nemo", "nemo": nemo.__version__, "decoding": config.decoding}

    def _model(self, spec: ModelSpec, config: EvalConfig) -> Any:
        if spec.name not in self._loaded:
            model = restore(spec, config.resolved_device())
            if config.decoding is not None:
                model.change_decoding_strategy(OmegaConf.merge(model.cfg.decoding, dict(config.decoding)))
            self._loaded[spec.name] = model
        return self._loaded[spec.name]

    def transcribe(self, spec: ModelSpec, utterances: list[Utterance], config: EvalConfig) -> list[str]:
        model = self._model(spec, config)
        with torch.inference_mode():
            hypotheses = model.transcribe(
                [str(u.audio) for u in utterances],
                batch_size=config.batch_size,
                num_workers=config.num_workers,
                verbose=False,
            )
        return [hypothesis_text(h) for h in hypotheses]

    def format_transcripts(self, manifest: Path, hypotheses: Sequence[str], scores: Sequence[WerStats]) -> str:
        """JSON lines: each manifest entry as written, with ``pred_text`` (what NeMo's
        ``speech_to_text_eval.py`` scores); the counts are in ``report.json``."""
        entries = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
        return "".join(json.dumps({**entry, "pred_text": text}) + "\n" for entry, text in zip(entries, hypotheses))

    def release(self, spec: ModelSpec) -> None:
        self._loaded.pop(spec.name, None)


def evaluate(config: EvalConfig | DictConfig | dict, progress: bool = True) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the evaluation described by ``config``; returns the report and its files."""
    if not isinstance(config, EvalConfig):
        config = EvalConfig.from_mapping(config)
    return run_evaluation(NemoBackend(), config, progress)


def main() -> None:
    from nemo.core.config import hydra_runner
    from nemo.utils import logging

    @hydra_runner(config_path=None, config_name=None)
    def run(cfg: DictConfig) -> None:
        try:
            _, files = evaluate(cfg)
        except MergeError as e:
            logging.error(str(e))
            sys.exit(2)
        logging.info(f"wrote {', '.join(str(f) for f in files.values())}")

    run()


if __name__ == "__main__":
    sys.argv = config_path_from_cwd(sys.argv)
    main()
