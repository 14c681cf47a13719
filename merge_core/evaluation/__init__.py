"""Toolkit-free scoring, forgetting reports and an evaluation cache.

The NeMo and SpeechBrain adapters decode with their own toolkit and hand the
transcripts here: :func:`score_utterances` turns references and hypotheses into one
:class:`WerStats` per utterance and :func:`score` into pooled ones, :func:`build_report` and
:func:`write_report` produce the Table VII style report (JSON, Markdown, PNG) with paired
bootstrap intervals (:class:`PairedBootstrap`), and :class:`EvalCache` keeps decoding
outputs keyed by weights, manifest and decoding settings.
"""

from merge_core.evaluation.bootstrap import BootstrapSettings, PairedBootstrap
from merge_core.evaluation.cache import EvalCache, cache_key, manifest_digest
from merge_core.errors import EvaluationError
from merge_core.evaluation.report import (
    DEFAULT_FORGETTING_SETS,
    ModelSource,
    average_wer,
    build_report,
    forgetting_pct,
    pooled_stats,
    render_markdown,
    results_from_report,
    write_report,
)
from merge_core.evaluation.text import TextNormalization
from merge_core.evaluation.wer import WerStats, score, score_utterances

__all__ = [
    "DEFAULT_FORGETTING_SETS",
    "BootstrapSettings",
    "EvalCache",
    "EvaluationError",
    "ModelSource",
    "PairedBootstrap",
    "TextNormalization",
    "WerStats",
    "average_wer",
    "build_report",
    "cache_key",
    "forgetting_pct",
    "manifest_digest",
    "pooled_stats",
    "render_markdown",
    "results_from_report",
    "score",
    "score_utterances",
    "write_report",
]
