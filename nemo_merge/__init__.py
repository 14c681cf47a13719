"""NeMo adapter for asr-merge: ``.nemo`` checkpoint I/O, forgetting evaluation, fine-tuning
callbacks (LLRD, slanted triangular LR, LoRA, L-MAM, expert export) and Hydra scripts.

The core finds it through its plugin (:mod:`nemo_merge.plugin`, entry point
``asr_merge.toolkits: nemo``); importing this package imports no NeMo.
"""
