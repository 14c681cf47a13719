"""SpeechBrain adapter for asr-merge: ``Checkpointer`` folder I/O, hparams helpers, Brain hooks.

Registers its checkpoint kinds with :mod:`merge_core.checkpoint` on import.
"""
