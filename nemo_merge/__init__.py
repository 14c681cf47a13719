"""NeMo adapter for asr-merge: ``.nemo`` checkpoint I/O, forgetting evaluation, Hydra scripts.

Importing it registers the ``.nemo`` checkpoint kind with :mod:`merge_core.checkpoint`;
that part needs no NeMo import, so ``asr-merge merge`` on ``.nemo`` files starts fast.
"""

from nemo_merge import nemo_io  # noqa: F401  (registers the .nemo kind)
from nemo_merge import select  # noqa: F401  (registers the greedy-soup dev evaluator; imports NeMo only when used)
