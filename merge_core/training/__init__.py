"""Toolkit-free fine-tuning pieces shared by the NeMo and SpeechBrain adapters.

- :mod:`merge_core.training.llrd`: layer-wise learning-rate decay as optimizer groups.
- :mod:`merge_core.training.stlr`: the slanted triangular learning-rate schedule.
- :mod:`merge_core.training.lora`: LoRA through PEFT, including depthwise 1-D
  convolutions, and the fold-back that gives a plain model with the base's keys.
- :mod:`merge_core.training.snapshots`: weights-only snapshots along a trajectory.

Nothing here imports NeMo, SpeechBrain or Lightning; only :mod:`~merge_core.training.lora`
imports PEFT, so import it only when LoRA is wanted.
"""
