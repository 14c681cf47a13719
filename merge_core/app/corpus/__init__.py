"""Speech corpora for the demo: a synthetic LibriSpeech-like corpus with target domains
(:func:`prepare_synthetic_corpus`), and NeMo/SpeechBrain manifests from any
LibriSpeech-layout folder, the real LibriSpeech included (:func:`prepare_librispeech`).

As lhotse's recipes do, each ``prepare_*`` function writes named files and returns what
it wrote; the ``asr-merge make-corpus`` and ``prepare-librispeech`` commands are thin
wrappers. Audio is made by espeak-ng and sox; text comes from Debian's ``fortunes``.
"""

from merge_core.app.corpus.domains import DOMAINS, SIZES
from merge_core.errors import CorpusError
from merge_core.app.corpus.librispeech import prepare_librispeech
from merge_core.app.corpus.synthetic import prepare_synthetic_corpus

__all__ = ["DOMAINS", "SIZES", "CorpusError", "prepare_librispeech", "prepare_synthetic_corpus"]
