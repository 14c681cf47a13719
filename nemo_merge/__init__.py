"""NeMo adapter for asr-merge: ``.nemo`` checkpoint I/O, training callbacks, Hydra scripts.

Registers its checkpoint kinds with :mod:`merge_core.checkpoint` on import.
"""
