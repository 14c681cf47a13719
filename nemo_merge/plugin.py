"""The NeMo toolkit as an asr-merge plugin (entry point ``asr_merge.toolkits: nemo``).

Declared without importing NeMo: the ``.nemo`` checkpoint kind reads and writes archives
with the standard library and torch; everything else is imported when first used.
"""

from merge_core.plugins import ToolkitPlugin
from nemo_merge.nemo_io import NEMO_KIND

TOOLKIT = ToolkitPlugin(
    name="nemo",
    extra="nemo",
    requires=("nemo.collections.asr",),
    checkpoint_kinds=(NEMO_KIND,),
    evaluate="nemo_merge.evaluate:evaluate",
    dev_evaluators={NEMO_KIND.name: "nemo_merge.select:NemoDevEvaluator"},
    train_run="nemo_merge.mact:train_run",
    collect_grams="nemo_merge.grams:collect_grams",
    demos={"default": "nemo_merge.demo:NEMO"},
)
