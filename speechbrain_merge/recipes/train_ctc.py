"""Recipe for training a CTC ASR model on CSV manifests with SpeechBrain, and for
fine-tuning one into a domain expert for merging.

The encoder is a convolutional front end and a Conformer (``TransformerASR.encode``),
decoded by greedy CTC. The data are CSVs in ``librispeech_prepare.py``'s layout
(``ID,duration,wav,spk_id,wrd``). Every epoch ends with the validation WER and a
checkpoint; training resumes from the latest checkpoint of ``save_folder``. The Brain is
a :class:`~speechbrain_merge.brain.MergeableBrain`: the hparams keys ``llrd``, ``stlr``,
``lora``, ``lmam``, ``export_path`` and ``snapshot_every_n_steps`` work here, and
``init_from`` starts the run from a generalist's ``CKPT+`` folder.

To train (e.g. with configs/speechbrain/tiny_ctc.yaml):

> python -m speechbrain_merge.recipes.train_ctc hparams.yaml --output_folder=results/ctc \\
      --data_root=/data --train_csv=train.csv --valid_csv=dev.csv

To fine-tune an expert from the shipped generalist (its architecture, tokenizer, a
fine-tuning rate, LLRD, STLR and the export are in the hparams):

> python -m speechbrain_merge.recipes.train_ctc configs/speechbrain/finetune_generalist.yaml \\
      --output_folder=results/experts/noisy --data_root=/data \\
      --train_csv=noisy/train.csv --valid_csv=noisy/dev.csv
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from speechbrain_merge.brain import MergeableBrain, brain_from_hparams


class CTCBrain(MergeableBrain):
    """CTC training and evaluation; ``tokenizer`` (a SentencePieceProcessor) is set by the caller."""

    def compute_forward(self, batch, stage):
        """Waveforms to CTC log-probabilities, plus greedy hypotheses outside training."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        p_ctc = self.hparams.log_softmax(self.modules.ctc_lin(self.encode(wavs, wav_lens)))
        if stage == sb.Stage.TRAIN:
            return p_ctc, wav_lens, None
        return p_ctc, wav_lens, sb.decoders.ctc_greedy_decode(p_ctc, wav_lens, blank_id=self.hparams.blank_index)

    def encode(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> torch.Tensor:
        """Waveforms to encoder states: Fbank, global normalization, CNN front end, Conformer."""
        feats = self.hparams.compute_features(wavs)
        feats = self.modules.normalize(feats, wav_lens, epoch=self.hparams.epoch_counter.current)
        return self.modules.Transformer.encode(self.modules.CNN(feats), wav_lens)

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss; outside training, also the word errors of the hypotheses."""
        p_ctc, wav_lens, hypotheses = predictions
        tokens, token_lens = batch.tokens
        if stage != sb.Stage.TRAIN:
            words = [self.tokenizer.decode_ids(h).split(" ") for h in hypotheses]
            self.wer_metric.append(batch.id, words, [w.split(" ") for w in batch.wrd])
        return self.hparams.ctc_cost(p_ctc, tokens, wav_lens, token_lens)

    def on_stage_start(self, stage, epoch):
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.wer_computer()

    def on_stage_end(self, stage, stage_loss, epoch):
        """Anneal the learning rate (NewBob, unless LLRD or STLR set the rates) and
        checkpoint after validation; write WERs after testing."""
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        stats["WER"] = self.wer_metric.summarize("error_rate")
        if stage == sb.Stage.VALID:
            lr = self.optimizer.param_groups[-1]["lr"]
            annealing = getattr(self.hparams, "lr_annealing", None)
            if annealing is not None and not self.owns_learning_rate:
                lr, new_lr = annealing(stage_loss)
                sb.nnet.schedulers.update_learning_rate(self.optimizer, new_lr)
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": lr}, train_stats=self.train_stats, valid_stats=stats
            )
            self.checkpointer.save_and_keep_only(
                meta={"WER": stats["WER"]}, min_keys=["WER"], num_to_keep=self.hparams.avg_checkpoints
            )
        else:
            self.test_stats = stats
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stats
            )
            with open(self.hparams.wer_file, "w", encoding="utf-8") as w:
                self.wer_metric.write_stats(w)


def csv_dataset(csv_path: str, hparams: dict[str, Any], tokenizer: Any) -> sb.dataio.dataset.DynamicItemDataset:
    """One CSV as a dataset of ``id``, ``sig`` (the waveform), ``wrd`` and ``tokens``,
    ``$data_root`` in its paths replaced as the LibriSpeech recipes do."""
    data = sb.dataio.dataset.DynamicItemDataset.from_csv(
        csv_path=csv_path, replacements={"data_root": hparams["data_root"]}
    )

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens")
    def text_pipeline(wrd):
        yield wrd
        yield torch.LongTensor(tokenizer.encode_as_ids(wrd))

    sb.dataio.dataset.add_dynamic_item([data], audio_pipeline)
    sb.dataio.dataset.add_dynamic_item([data], text_pipeline)
    sb.dataio.dataset.set_output_keys([data], ["id", "sig", "wrd", "tokens"])
    return data


def build_brain(hparams: dict[str, Any], run_opts: Any = None, brain_class: type[CTCBrain] = CTCBrain) -> CTCBrain:
    """The ``brain_class`` of ``hparams`` with its checkpointer and the tokenizer (trained on first use)."""
    brain = brain_from_hparams(brain_class, hparams, run_opts)
    brain.tokenizer = hparams["tokenizer"].sp
    return brain


def init_from_checkpoint(hparams: dict[str, Any]) -> None:
    """Load ``init_recoverables`` from the ``CKPT+`` folder ``init_from`` (when set) with
    SpeechBrain's Pretrainer: the run fine-tunes that checkpoint instead of starting afresh."""
    from speechbrain.utils.parameter_transfer import Pretrainer

    folder = hparams.get("init_from")
    if not folder:
        return
    names = hparams.get("init_recoverables") or ["model", "normalizer"]
    recoverables = hparams["checkpointer"].recoverables
    unknown = [n for n in names if n not in recoverables]
    if unknown:
        raise ValueError(f"init_recoverables {unknown} are not recoverables of the checkpointer ({', '.join(recoverables)})")
    missing = [n for n in names if not (Path(folder) / f"{n}.ckpt").is_file()]
    if missing:
        raise FileNotFoundError(f"init_from: {folder} has no {', '.join(f'{n}.ckpt' for n in missing)}")
    pretrainer = Pretrainer(
        collect_in=Path(hparams["output_folder"]) / "init_from",
        loadables={n: recoverables[n] for n in names},
        paths={n: str(Path(folder).resolve() / f"{n}.ckpt") for n in names},
    )
    pretrainer.collect_files()
    pretrainer.load_collected()


def fit(hparams: dict[str, Any], run_opts: Any = None, brain_class: type[CTCBrain] = CTCBrain) -> CTCBrain:
    """Train on ``train_csv`` (from ``init_from`` when set), validating and checkpointing
    on ``valid_csv`` every epoch."""
    init_from_checkpoint(hparams)
    brain = build_brain(hparams, run_opts, brain_class)
    valid = csv_dataset(hparams["valid_csv"], hparams, brain.tokenizer).filtered_sorted(sort_key="duration")
    brain.fit(
        hparams["epoch_counter"],
        csv_dataset(hparams["train_csv"], hparams, brain.tokenizer),
        valid,
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    return brain


def main(argv: Sequence[str] | None = None, brain_class: type[CTCBrain] = CTCBrain) -> None:
    hparams_file, run_opts, overrides = sb.parse_arguments(list(argv) if argv is not None else sys.argv[1:])
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    fit(hparams, run_opts, brain_class)


if __name__ == "__main__":
    main()
