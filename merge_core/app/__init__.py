"""asr-merge's application, built on the library (:mod:`merge_core`), which never imports it:

- :mod:`merge_core.app.cli`: the ``asr-merge`` command line;
- :mod:`merge_core.app.demo`: the AoDE demo and its experiment runner;
- :mod:`merge_core.app.corpus`: the synthetic multi-domain corpus and LibriSpeech manifests;
- :mod:`merge_core.app.pretrained`: fetching and converting pretrained generalists.
"""
