"""Shared settings of the hardening tests (fuzz, crash, concurrency, disk, limits).

CI runs a bounded number of generated examples; ``ASR_MERGE_FUZZ_EXAMPLES`` (or
``make fuzz``) runs more. Hypothesis keeps no example database in the repository:
every run draws fresh inputs from its seed.
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("ASR_MERGE_FUZZ_EXAMPLES", "30"))

settings.register_profile(
    "asr-merge",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # first calls import torch and friends; time bounds are asserted per call instead
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile("asr-merge")

# the real tiny NeMo model and speech of tests/nemo_merge, for the races and the full disk
from tests.nemo_merge.conftest import nemo_audio_manifest, tiny_nemo_base, tiny_tokenizer_dir  # noqa: E402, F401


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list) -> None:
    """Hypothesis's plugin reads ``__file__`` of every module in ``sys.modules`` once tests
    are collected; SpeechBrain puts lazy modules there whose attribute lookups import
    optional dependencies (``speechbrain.integrations.nlp`` needs flair) and raise
    ImportError. The ones never loaded are dropped first: importing them again works as before."""
    for name, module in list(sys.modules.items()):
        if type(module).__name__ in ("LazyModule", "DeprecatedModuleRedirect") and getattr(module, "__dict__", {}).get("lazy_module", 0) is None:
            del sys.modules[name]
