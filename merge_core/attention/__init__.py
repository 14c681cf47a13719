"""Attention merging across architectures (Sundar et al., "Multimodal Attention Merging for
Improved Speech Recognition and Audio Event Classification"):

- :mod:`~merge_core.attention.name_map`: which source tensor goes into which target tensor;
- :mod:`~merge_core.attention.similarity`: choosing layers by Sliced Wasserstein Distance;
- :mod:`~merge_core.attention.interpolation`: MAM's Eq. 1 and the noise baselines;
- :mod:`~merge_core.attention.lmam`: L-MAM, the per-layer factor learned while fine-tuning.
"""
