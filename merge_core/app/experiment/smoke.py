"""The smoke experiment: two target domains of the smoke-size synthetic corpus, one expert
each (two fine-tuning steps) and their average, evaluated on test-clean, test-other and both
domains' test sets. Seconds on 2 CPU cores: what the tests and the executor benchmark run
on every executor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merge_core.app.corpus import prepare_librispeech, prepare_synthetic_corpus
from merge_core.app.corpus.domains import ORIGINAL
from merge_core.app.corpus.librispeech import manifest_name

SMOKE_DOMAINS = ("accented", "noisy")


def prepare_smoke_data(root: Path) -> Path:
    """The smoke corpus in ``root/corpus`` and both toolkits' manifests in ``root/manifests``
    (reused when complete); returns ``root``."""
    prepare_synthetic_corpus(root / "corpus", size="smoke", seed=0, progress=False)
    for domain in (ORIGINAL, *SMOKE_DOMAINS):
        prepare_librispeech(root / "corpus" / domain, root / "manifests" / domain, toolkit="both")
    return root


def smoke_experiment(root: Path, toolkit: str, storage: Path, **changes: Any) -> dict[str, Any]:
    """The experiment (as a file's mapping) over :func:`prepare_smoke_data`'s ``root``."""
    def manifest(domain: str, split: str) -> str:
        return str(root / "manifests" / domain / manifest_name(split, toolkit))

    return {
        "name": f"smoke-{toolkit}",
        "toolkit": toolkit,
        "storage": str(storage),
        "data_root": str(root / "corpus"),
        "domains": {d: {s: manifest(d, s) for s in ("train", "dev", "test")} for d in SMOKE_DOMAINS},
        "original": {"test_clean": manifest(ORIGINAL, "test-clean"), "test_other": manifest(ORIGINAL, "test-other")},
        "finetune": {"epochs": 1, "max_steps": 2, "batch_size": 4},
        "procedures": [{"experts": {"domains": "all"}}, {"merge": {"name": "AoDE", "method": "average"}}],
        "local": {"jobs": 2},
        **changes,
    }
