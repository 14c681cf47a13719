"""The SpeechBrain toolkit as an asr-merge plugin (entry point ``asr_merge.toolkits: speechbrain``).

Declared without importing SpeechBrain: ``CKPT+`` checkpoint folders are read and written
with torch and PyYAML; everything else is imported when first used.
"""

from merge_core.plugins import ToolkitPlugin
from speechbrain_merge.checkpoint_io import CHECKPOINTER_KIND

TOOLKIT = ToolkitPlugin(
    name="speechbrain",
    extra="speechbrain",
    requires=("speechbrain",),
    checkpoint_kinds=(CHECKPOINTER_KIND,),
    evaluate="speechbrain_merge.evaluate:evaluate",
    dev_evaluators={CHECKPOINTER_KIND.name: "speechbrain_merge.select:SpeechBrainDevEvaluator"},
    train_run="speechbrain_merge.mact:train_run",
    collect_grams="speechbrain_merge.grams:collect_grams",
    demos={"default": "speechbrain_merge.demo:SPEECHBRAIN", "whisper-tiny.en": "speechbrain_merge.whisper_demo:WHISPER"},
)
