"""SpeechBrain adapter for asr-merge: ``Checkpointer`` folder I/O, forgetting evaluation,
``MergeableBrain`` (LLRD, slanted triangular LR, LoRA, L-MAM, expert export) and recipes.

The core finds it through its plugin (:mod:`speechbrain_merge.plugin`, entry point
``asr_merge.toolkits: speechbrain``); importing this package imports no SpeechBrain.
"""
