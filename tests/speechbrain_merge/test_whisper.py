"""Whisper experts whose encoder is frozen: the generalist as a CKPT+ folder, encoder
outputs kept on disk, decoder-only fine-tuning by a real ``Brain.fit`` and
``WhisperASR`` evaluation that reuses the states without changing a transcript.

A random 2 + 2 layer Whisper built from a config (``write_tiny_whisper``) and
espeak-ng speech (``sb_data``); the real Whisper tiny.en runs in the demo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("speechbrain")

from merge_core.errors import EvaluationError
from speechbrain_merge.evaluate import evaluate
from speechbrain_merge.recipes.train_whisper import WhisperBrain, encoder_states_by_id, fit, whisper_dataset, whisper_text
from speechbrain_merge.whisper import CHECKPOINT_NAME, EncoderStates, encoder_digest, write_generalist

from .conftest import read_csv, write_tiny_whisper

REPO = Path(__file__).resolve().parents[2]
TRAIN_HPARAMS = REPO / "configs" / "speechbrain" / "whisper_finetune.yaml"
INFERENCE_HPARAMS = REPO / "configs" / "speechbrain" / "whisper_inference.yaml"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return write_tiny_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def generalist(hub: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_generalist(hub, tmp_path_factory.mktemp("generalist") / "CKPT+tiny")


def load_hparams(hub: Path, sb_data, out: Path, **overrides) -> dict:
    from hyperpyyaml import load_hyperpyyaml

    base = {"output_folder": str(out), "whisper_hub": str(hub), "data_root": str(sb_data.data_root),
            "train_csv": str(sb_data.train_csv), "batch_size": 4}
    with open(TRAIN_HPARAMS, encoding="utf-8") as f:
        return load_hyperpyyaml(f, {**base, **overrides})


def test_generalist_folder_holds_the_wrappers_state_and_nothing_is_left_beside_it(hub: Path, generalist: Path) -> None:
    from speechbrain.integrations.huggingface.whisper import Whisper

    stored = torch.load(generalist / f"{CHECKPOINT_NAME}.ckpt", weights_only=True)
    expected = Whisper(str(hub), str(generalist.parent / "hf"), freeze=True).state_dict()
    assert set(stored) == set(expected) and "_mel_filters" in stored
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    assert (generalist / "CKPT.yaml").is_file()
    assert sorted(p.name for p in generalist.parent.iterdir() if p.name != "hf") == [generalist.name]
    with pytest.raises(ValueError, match="CKPT\\+"):
        write_generalist(hub, generalist.parent / "not-a-checkpoint")


def test_encoder_states_are_computed_once_per_encoder(hub: Path, sb_data, tmp_path: Path) -> None:
    hparams = load_hparams(hub, sb_data, tmp_path / "run", freeze_encoder=True)
    whisper, store = hparams["whisper"], EncoderStates(tmp_path / "states")
    first = encoder_states_by_id(str(sb_data.train_csv), hparams, whisper, store)
    assert len(first) == len(read_csv(sb_data.train_csv))
    (folder,) = (tmp_path / "states").iterdir()
    assert folder.name == encoder_digest(whisper) and len(list(folder.iterdir())) == len(first)

    def must_not_encode(indices):
        raise AssertionError(f"encoded {indices} again")

    rows = read_csv(sb_data.train_csv)
    wav = rows[0]["wav"].replace("$data_root", str(sb_data.data_root))
    again = store.states(whisper, [wav], must_not_encode)
    assert torch.equal(again[0], first[rows[0]["ID"]])
    with torch.no_grad():
        whisper.model.encoder.layers[0].fc1.weight[0, 0] += 1e-3  # another encoder: its own states
    calls = []
    store.states(whisper, [wav], lambda i: calls.append(i) or torch.zeros(len(i), *again.shape[1:]))
    assert calls == [[0]] and len(list((tmp_path / "states").iterdir())) == 2


def test_decoder_only_fit_keeps_the_encoder_and_cached_states_change_nothing(
    hub: Path, generalist: Path, sb_data, tmp_path: Path
) -> None:
    import speechbrain as sb

    hparams = load_hparams(hub, sb_data, tmp_path / "run", freeze_encoder=True, number_of_epochs=2, lr=1e-3,
                           max_steps=4, encoder_states_dir=str(tmp_path / "states"))
    hparams.update(export_path=str(tmp_path / "export"), export_recoverables=[CHECKPOINT_NAME])
    start = torch.load(generalist / f"{CHECKPOINT_NAME}.ckpt", weights_only=True)
    hparams["whisper"].load_state_dict(start)
    # one batch through both paths: the stored encoder outputs give the same log-probabilities
    brain = WhisperBrain(modules=hparams["modules"], hparams=hparams, run_opts={"device": "cpu"})
    whisper = hparams["whisper"]
    states = encoder_states_by_id(str(sb_data.train_csv), hparams, whisper, EncoderStates(tmp_path / "states"))
    batches = [sb.dataio.batch.PaddedBatch([next(iter(whisper_dataset(str(sb_data.train_csv), hparams, whisper, s)))])
               for s in (states, None)]
    with torch.no_grad():
        cached, uncached = (brain.compute_forward(b, sb.Stage.TRAIN) for b in batches)
    assert (cached - uncached).abs().max() < 1e-4

    trained = fit(hparams, {"device": "cpu", "noprogressbar": True})
    assert trained.optimizer_step == 4
    (expert,) = (tmp_path / "export").glob("CKPT+*")
    weights = torch.load(expert / f"{CHECKPOINT_NAME}.ckpt", weights_only=True)
    assert set(weights) == set(start)
    encoder = [k for k in start if k.startswith("model.encoder.")]
    assert encoder and all(torch.equal(weights[k], start[k]) for k in encoder)
    moved = [k for k in start if k.startswith("model.decoder.layers.") and not torch.equal(weights[k], start[k])]
    assert len(moved) > 10


def test_whisper_evaluation_reuses_states_and_transcribes_the_same(generalist: Path, hub: Path, sb_data, tmp_path: Path) -> None:
    base = {
        "models": [{"name": "generalist", "model": str(generalist)}],
        "manifests": {"test_clean": str(sb_data.test_clean_csv), "test_other": str(sb_data.test_other_csv)},
        "hparams": str(INFERENCE_HPARAMS),
        "hparams_overrides": {"whisper_hub": str(hub)},
        "interface": "WhisperASR",
        "data_root": str(sb_data.data_root),
        "batch_size": 4,
        "cache": False,
    }
    plain, _ = evaluate({**base, "output_dir": str(tmp_path / "plain")}, progress=False)
    stored, _ = evaluate({**base, "output_dir": str(tmp_path / "stored"), "encoder_states_dir": str(tmp_path / "s")},
                         progress=False)
    again, _ = evaluate({**base, "output_dir": str(tmp_path / "again"), "encoder_states_dir": str(tmp_path / "s")},
                        progress=False)
    assert plain["models"][0]["stats"] == stored["models"][0]["stats"] == again["models"][0]["stats"]
    assert plain["models"][0]["stats"]["test_clean"]["words"] > 0
    (folder,) = (tmp_path / "s").iterdir()
    assert len(list(folder.iterdir())) == 2 * len(read_csv(sb_data.test_clean_csv))
    with pytest.raises(EvaluationError, match="encoder_states_dir"):
        evaluate({**base, "interface": "EncoderASR", "encoder_states_dir": str(tmp_path / "s")}, progress=False)


def test_transcripts_are_written_as_whisper_writes() -> None:
    assert whisper_text("  THE BOAT SAILED ") == " The boat sailed"


def test_search_trials_take_stored_encoder_states_keyed_by_the_trials_encoder(generalist: Path, hub: Path, sb_data,
                                                                             tmp_path: Path) -> None:
    """The dev evaluator of searches and soups with ``encoder_states_dir``: the same WER as
    running the encoder, states stored once per utterance and encoder, and a trial with
    another encoder gets its own states."""
    from merge_core.checkpoint import open_checkpoint
    from merge_core.recipes.greedy_soup import DevSet
    from speechbrain_merge.select import SpeechBrainDevEvaluator

    options = {"hparams": str(INFERENCE_HPARAMS), "hparams_overrides": {"whisper_hub": str(hub)},
               "interface": "WhisperASR", "data_root": str(sb_data.data_root)}
    dev = DevSet(manifest=sb_data.test_clean_csv, log=tmp_path / "log.json", batch_size=4, device="cpu", options=options)
    stored_dev = DevSet(manifest=sb_data.test_clean_csv, log=tmp_path / "log.json", batch_size=4, device="cpu",
                        options={**options, "encoder_states_dir": str(tmp_path / "s")})
    with open_checkpoint(generalist) as reader:
        state = {name: reader.get(name) for name in reader.keys()}
        plain, stored = SpeechBrainDevEvaluator(reader, dev), SpeechBrainDevEvaluator(reader, stored_dev)
        moved = {n: t + 0.05 * t.std() if "encoder.layers.0.fc1.weight" in n else t for n, t in state.items()}
        assert stored.stats(state) == plain.stats(state) and stored.stats(state) == plain.stats(state)
        assert [len(list(f.iterdir())) for f in (tmp_path / "s").iterdir()] == [len(read_csv(sb_data.test_clean_csv))]
        assert stored.stats(moved) == plain.stats(moved)
        assert len(list((tmp_path / "s").iterdir())) == 2  # the moved encoder's own states
