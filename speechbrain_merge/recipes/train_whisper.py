"""Recipe for fine-tuning Whisper into an expert for merging, with SpeechBrain.

Whisper through SpeechBrain's Hugging Face wrapper, trained by teacher-forced
cross-entropy on the CSV's transcripts written as Whisper writes them (sentence case,
a leading space), with :class:`~speechbrain_merge.brain.MergeableBrain`'s ``llrd``,
``stlr``, ``lora`` and ``export_path`` keys (``configs/speechbrain/whisper_finetune.yaml``).
With ``freeze_encoder: True`` and ``encoder_states_dir`` set, the encoder runs once per
utterance (:class:`speechbrain_merge.whisper.EncoderStates`) and only the decoder trains.

To run this recipe:

> python -m speechbrain_merge.recipes.train_whisper configs/speechbrain/whisper_finetune.yaml \\
      --whisper_hub=$(asr-merge get-model whisper-tiny.en) --output_folder=results/whisper \\
      --data_root=/data --train_csv=train.csv
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from speechbrain_merge.brain import MergeableBrain, brain_from_hparams
from speechbrain_merge.whisper import EncoderStates, encode_audio


class WhisperBrain(MergeableBrain):
    """Whisper's decoder log-probabilities over the transcript, from cached encoder
    states when the batch has them, from the waveforms otherwise."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        tokens_bos, _ = batch.tokens_bos
        whisper = self.modules.whisper
        if hasattr(batch, "encoder_states"):
            logits, _, _ = whisper.forward_decoder(batch.encoder_states.data, tokens_bos, use_cache=False)
        else:
            _, logits, _ = whisper(batch.sig.data, tokens_bos)
        return logits.log_softmax(dim=-1)

    def compute_objectives(self, predictions, batch, stage):
        tokens_eos, tokens_eos_lens = batch.tokens_eos
        return sb.nnet.losses.nll_loss(predictions, tokens_eos, length=tokens_eos_lens)


def whisper_text(words: str) -> str:
    """A LibriSpeech-style transcript as Whisper writes text.

    >>> whisper_text("AND IF IT'S REAL IT CAN BE AFFECTED")
    " And if it's real it can be affected"
    """
    text = words.strip().lower()
    return " " + text[:1].upper() + text[1:]


def whisper_dataset(
    csv_path: str, hparams: dict[str, Any], whisper: Any, states: dict[str, torch.Tensor] | None = None
) -> sb.dataio.dataset.DynamicItemDataset:
    """One CSV as ``id``, ``tokens_bos`` (Whisper's prompt, then the text), ``tokens_eos``
    (the text, then end-of-text) and either ``encoder_states`` (from ``states``, by id) or ``sig``."""
    data = sb.dataio.dataset.DynamicItemDataset.from_csv(csv_path=csv_path, replacements={"data_root": hparams["data_root"]})
    prompt = list(whisper.tokenizer.prefix_tokens)  # <|startoftranscript|> ... <|notimestamps|>

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("tokens_bos", "tokens_eos")
    def text_pipeline(wrd):
        ids = whisper.tokenizer.encode(whisper_text(wrd), add_special_tokens=False)
        yield torch.LongTensor(prompt + ids)
        yield torch.LongTensor(prompt[1:] + ids + [whisper.eos])

    sb.dataio.dataset.add_dynamic_item([data], text_pipeline)
    if states is None:
        sb.dataio.dataset.add_dynamic_item([data], sb.dataio.dataio.read_audio, takes="wav", provides="sig")
    else:
        sb.dataio.dataset.add_dynamic_item([data], states.__getitem__, takes="id", provides="encoder_states")
    sb.dataio.dataset.set_output_keys([data], ["id", "tokens_bos", "tokens_eos", "sig" if states is None else "encoder_states"])
    return data


def encoder_states_by_id(csv_path: str, hparams: dict[str, Any], whisper: Any, store: EncoderStates) -> dict[str, torch.Tensor]:
    """Every utterance's encoder output, from ``store`` or computed ``batch_size`` at a time."""
    data = sb.dataio.dataset.DynamicItemDataset.from_csv(csv_path=csv_path, replacements={"data_root": hparams["data_root"]})
    data.set_output_keys(["id", "wav"])
    rows = list(data)
    states: dict[str, torch.Tensor] = {}
    size = hparams["batch_size"]
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        wavs = [row["wav"] for row in chunk]

        def encode(indices: list[int], wavs: list[str] = wavs) -> torch.Tensor:
            padded, _ = sb.utils.data_utils.batch_pad_right([sb.dataio.dataio.read_audio(wavs[i]) for i in indices])
            return encode_audio(whisper, padded)

        states.update(zip((row["id"] for row in chunk), store.states(whisper, wavs, encode)))
    return states


def fit(hparams: dict[str, Any], run_opts: Any = None, brain_class: type[WhisperBrain] = WhisperBrain) -> WhisperBrain:
    """Train on ``train_csv``; the expert is exported when ``fit`` ends (``export_path``)."""
    brain = brain_from_hparams(brain_class, hparams, run_opts)
    whisper = hparams["whisper"]
    states = None
    if hparams.get("encoder_states_dir"):
        if not hparams["freeze_encoder"]:
            raise ValueError("encoder_states_dir keeps a frozen encoder's outputs: set freeze_encoder: True")
        states = encoder_states_by_id(hparams["train_csv"], hparams, whisper, EncoderStates(hparams["encoder_states_dir"]))
    train = whisper_dataset(hparams["train_csv"], hparams, whisper, states)
    brain.fit(hparams["epoch_counter"], train, None, train_loader_kwargs=hparams["train_dataloader_opts"])
    return brain


def main(argv: Sequence[str] | None = None) -> None:
    hparams_file, run_opts, overrides = sb.parse_arguments(list(argv) if argv is not None else sys.argv[1:])
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    fit(hparams, run_opts)


if __name__ == "__main__":
    main()
