"""SpeechBrain adapter for asr-merge: ``Checkpointer`` folder I/O, hparams helpers, Brain hooks.

Registers its checkpoint kinds with :mod:`merge_core.checkpoint` on import; that part
needs no SpeechBrain import, so ``asr-merge merge`` on ``CKPT+`` folders starts fast.
"""

from speechbrain_merge import checkpoint_io  # noqa: F401  (registers the CKPT+ folder kind)
from speechbrain_merge import select  # noqa: F401  (registers the greedy-soup dev evaluator; imports SpeechBrain only when used)
