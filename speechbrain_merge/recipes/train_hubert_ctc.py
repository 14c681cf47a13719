"""Recipe for a HuBERT CTC model through SpeechBrain's Hugging Face wrapper.

``train_ctc``'s recipe with the encoder swapped: raw waveforms go through
``speechbrain.integrations.huggingface.hubert.HuBERT`` (any local Hugging Face HuBERT
or wav2vec2 folder, or a hub name for users with network access), then a linear CTC
head. The Brain is ``train_ctc``'s, a :class:`~speechbrain_merge.brain.MergeableBrain`, so the hparams
keys ``lmam`` (Sundar et al.'s L-MAM, e.g. a BERT's attention), ``llrd``, ``stlr`` and
``export_path`` work here.

To run this recipe (e.g. with configs/speechbrain/tiny_hubert_ctc.yaml):

> python -m speechbrain_merge.recipes.train_hubert_ctc hparams.yaml --output_folder=results/hubert \\
      --hubert_source=path/to/hubert --data_root=/data --train_csv=train.csv --valid_csv=dev.csv
"""

from __future__ import annotations

import torch

from speechbrain_merge.recipes.train_ctc import CTCBrain, main


class HubertCTCBrain(CTCBrain):
    """CTC over the HuBERT wrapper's last hidden states."""

    def encode(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> torch.Tensor:
        """Waveforms to HuBERT's last-layer states (the wrapper normalizes the waveform)."""
        return self.modules.hubert(wavs, wav_lens)


if __name__ == "__main__":
    main(brain_class=HubertCTCBrain)
