"""Real SpeechBrain fixtures, built once per session in a temporary folder.

- ``sb_data``: espeak-ng speech in a LibriSpeech-like tree under ``data_root`` and CSVs
  in ``librispeech_prepare.py``'s layout (``ID,duration,wav,spk_id,wrd``, upper-case
  transcripts): ``train.csv`` and ``test_clean.csv`` write ``$data_root/...`` paths,
  ``test_other.csv`` (the same sentences in other voices) absolute ones.
- ``sb_generalist``: a real ``Brain.fit`` of ``configs/speechbrain/tiny_ctc.yaml`` for
  three epochs: three ``CKPT+`` folders, each with model, normalizer, scheduler,
  counter, optimizer, brain and dataloader recoverables.
- ``sb_experts``: two experts fine-tuned from the generalist's last checkpoint by
  ``Brain.fit`` (one more epoch each, own seed and learning rate).

Learning rates are small on purpose: early in training, before the CTC blank wins
every frame, the model emits input-dependent tokens, so hypotheses are non-empty and
WER comparisons can fail. Fixtures skip without SpeechBrain (``pip install -e
".[speechbrain]"``) or espeak-ng (``apt-get install espeak-ng sox``).
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from merge_core.app.corpus.audio import synthesize

REPO = Path(__file__).resolve().parents[2]
TRAIN_HPARAMS = REPO / "configs" / "speechbrain" / "tiny_ctc.yaml"
INFERENCE_HPARAMS = REPO / "configs" / "speechbrain" / "tiny_ctc_inference.yaml"
CSV_COLUMNS = ["ID", "duration", "wav", "spk_id", "wrd"]
SPEED = 140  # words per minute: a few encoder frames (40 ms) per token, as CTC needs

# (LibriSpeech-style ID, transcript)
SENTENCES = [
    ("1089-134686-0000", "HE HOPED THERE WOULD BE STEW FOR DINNER"),
    ("1089-134686-0001", "THE ROOM WAS WARM AND QUIET"),
    ("1188-133604-0000", "SHE LOOKED AT THE OLD MAP AGAIN"),
    ("1188-133604-0001", "WE WALKED HOME ALONG THE RIVER"),
    ("121-121726-0000", "THE BOAT SAILED INTO THE HARBOUR"),
    ("121-121726-0001", "A COLD WIND CAME FROM THE NORTH"),
    ("1284-1180-0000", "HIS FRIEND OPENED THE DOOR SLOWLY"),
    ("1284-1180-0001", "THEY SANG A SONG BY THE FIRE"),
]
CLEAN_VOICES = ("en-us", "en-gb")
OTHER_VOICES = ("en-us+m3", "en-gb+f2")

GENERALIST = {"seed": 1, "lr": 1e-4, "number_of_epochs": 3}
EXPERTS = [{"seed": 2, "lr": 2e-4}, {"seed": 3, "lr": 1e-4}]  # one epoch more each


@dataclass(frozen=True)
class SBData:
    data_root: Path
    train_csv: Path
    test_clean_csv: Path
    test_other_csv: Path


@dataclass(frozen=True)
class SBRun:
    """One training run: its output folder and checkpoints, oldest first."""

    output_folder: Path
    checkpoints: list[Path]

    @property
    def last(self) -> Path:
        return self.checkpoints[-1]


def write_csv(path: Path, rows: list[dict[str, str]], columns: list[str] = CSV_COLUMNS) -> Path:
    """Rows as a CSV of ``columns`` (other keys of the rows are left out)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def synthesize_split(data_root: Path, split: str, voices: tuple[str, ...], placeholder: bool) -> list[dict[str, str]]:
    """Speak every sentence into ``LibriSpeech/<split>/<spk>/<chapter>/<ID>.wav``; the CSV rows."""
    rows = []
    for i, (uid, text) in enumerate(SENTENCES):
        speaker, chapter, _ = uid.split("-")
        relative = f"LibriSpeech/{split}/{speaker}/{chapter}/{uid}.wav"
        duration = synthesize(text.lower(), data_root / relative, voice=voices[i % len(voices)], speed=SPEED)
        wav = f"$data_root/{relative}" if placeholder else str(data_root / relative)
        rows.append({"ID": uid, "duration": f"{duration:.3f}", "wav": wav, "spk_id": speaker, "wrd": text})
    return rows


@pytest.fixture(scope="session")
def sb_data(tmp_path_factory: pytest.TempPathFactory) -> SBData:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng sox)")
    root = tmp_path_factory.mktemp("sb_data")
    data_root = root / "data"
    clean = synthesize_split(data_root, "test-clean", CLEAN_VOICES, placeholder=True)
    other = synthesize_split(data_root, "test-other", OTHER_VOICES, placeholder=False)
    return SBData(
        data_root=data_root,
        train_csv=write_csv(root / "train.csv", clean),
        test_clean_csv=write_csv(root / "test_clean.csv", clean),
        test_other_csv=write_csv(root / "test_other.csv", other),
    )


@pytest.fixture(scope="session")
def sb_hparams(sb_data: SBData) -> Callable[..., dict[str, Any]]:
    """``load(output_folder, **overrides)``: the training hparams of a run in
    ``output_folder`` on ``sb_data``, as ``load_hyperpyyaml`` builds them."""
    pytest.importorskip("speechbrain")
    from hyperpyyaml import load_hyperpyyaml

    def load(output_folder: Path, **overrides: Any) -> dict[str, Any]:
        data = {
            "output_folder": str(output_folder),
            "data_root": str(sb_data.data_root),
            "train_csv": str(sb_data.train_csv),
            "valid_csv": str(sb_data.test_clean_csv),
        }
        with open(TRAIN_HPARAMS, encoding="utf-8") as f:
            return load_hyperpyyaml(f, {**data, **overrides})

    return load


def checkpoints(save_folder: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first, as SpeechBrain's Checkpointer orders them."""
    from speechbrain.utils.checkpoints import Checkpointer

    return [c.path for c in reversed(Checkpointer(save_folder).find_checkpoints())]


def fit(hparams: dict[str, Any]) -> SBRun:
    """A real ``Brain.fit`` of the recipe; resumes from the save folder's latest checkpoint."""
    from speechbrain_merge.recipes.train_ctc import fit as fit_recipe

    fit_recipe(hparams, {"device": "cpu", "noprogressbar": True})
    return SBRun(Path(hparams["output_folder"]), checkpoints(Path(hparams["save_folder"])))


def tokenizer_file(run: SBRun) -> Path:
    """The SentencePiece model the run trained (``<vocab_size>_unigram.model``)."""
    return next((run.output_folder / "tokenizer").glob("*.model"))


@pytest.fixture(scope="session")
def sb_generalist(tmp_path_factory: pytest.TempPathFactory, sb_hparams: Callable[..., dict[str, Any]]) -> SBRun:
    run = fit(sb_hparams(tmp_path_factory.mktemp("sb_generalist"), **GENERALIST))
    assert len(run.checkpoints) == GENERALIST["number_of_epochs"]
    return run


@pytest.fixture(scope="session")
def sb_experts(
    tmp_path_factory: pytest.TempPathFactory, sb_hparams: Callable[..., dict[str, Any]], sb_generalist: SBRun
) -> list[SBRun]:
    """Each expert's run; its last checkpoint is the expert."""
    runs = []
    for i, settings in enumerate(EXPERTS):
        output = tmp_path_factory.mktemp(f"sb_expert{i}")
        shutil.copytree(sb_generalist.last, output / "save" / sb_generalist.last.name)
        hparams = sb_hparams(
            output,
            tokenizer_folder=str(sb_generalist.output_folder / "tokenizer"),
            number_of_epochs=GENERALIST["number_of_epochs"] + 1,
            **settings,
        )
        runs.append(fit(hparams))
    return runs


def write_tiny_whisper(folder: Path) -> Path:
    """A random 2 + 2 layer Whisper, its feature extractor and a byte-level tokenizer
    (256 byte tokens and Whisper's special tokens, no merges): what the wrapper loads."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    special = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        "<|en|>",
        "<|transcribe|>",
        "<|translate|>",
        "<|notimestamps|>",
    ]
    vocab = {token: i for i, token in enumerate(list(bytes_to_unicode().values()) + special)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    hub = folder / "whisper_hub"
    config = WhisperConfig(
        vocab_size=len(vocab),
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_target_positions=64,
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        pad_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        bos_token_id=vocab["<|endoftext|>"],
    )
    WhisperForConditionalGeneration(config).save_pretrained(hub)
    WhisperTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(hub)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(hub)
    return hub
