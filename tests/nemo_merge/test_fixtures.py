"""The NeMo fixtures are what they claim: real audio, a real tokenizer, restorable models, trained experts."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import wave
from pathlib import Path

import pytest
import torch
import yaml

from merge_core.app.corpus.audio import synthesize
from merge_core.evaluation.manifests import read_nemo_manifest

from .conftest import EXPERT_STEPS, TINY_CONFIG, TOKENIZER_VOCAB, UTTERANCES


def nemo_members(path: Path) -> dict[str, bytes]:
    """The files of a ``.nemo`` tar, by member name."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def nemo_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a ``.nemo``, read without NeMo."""
    return torch.load(io.BytesIO(nemo_members(path)["./model_weights.ckpt"]), weights_only=True)


def test_audio_is_16k_mono_and_matches_the_manifest(nemo_audio_manifest):
    utterances = read_nemo_manifest(nemo_audio_manifest)
    assert [u.text for u in utterances] == [text for text, _ in UTTERANCES]
    raw = [json.loads(line) for line in nemo_audio_manifest.read_text().splitlines() if line]
    relative = [not Path(entry["audio_filepath"]).is_absolute() for entry in raw]
    assert relative == [i % 2 == 0 for i in range(len(raw))]
    for u in utterances:
        assert u.text == u.text.lower()
        with wave.open(str(u.audio), "rb") as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
            assert wav.getnframes() / 16000 == pytest.approx(u.duration, abs=1e-6)
        assert 0.5 < u.duration < 5.0


def test_synthesize_is_deterministic_and_voices_differ(tmp_path):
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng sox)")
    text = "merge the weights of two experts"
    first = synthesize(text, tmp_path / "a.wav")
    second = synthesize(text, tmp_path / "b.wav")
    synthesize(text, tmp_path / "gb.wav", voice="en-gb")
    assert first == second
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    assert (tmp_path / "a.wav").read_bytes() != (tmp_path / "gb.wav").read_bytes()


def test_tokenizer_dir_has_nemo_layout(tiny_tokenizer_dir):
    import sentencepiece

    assert {p.name for p in tiny_tokenizer_dir.iterdir()} == {"tokenizer.model", "tokenizer.vocab", "vocab.txt"}
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    assert 32 <= sp.get_piece_size() <= TOKENIZER_VOCAB
    # every spoken word is made of known pieces, none of them <unk>
    for text, _ in UTTERANCES:
        assert sp.unk_id() not in sp.encode(text)
        assert sp.decode(sp.encode(text)) == text


def test_train_tokenizer_refuses_a_used_folder(tiny_tokenizer_dir):
    from nemo_merge.models import train_tokenizer

    with pytest.raises(FileExistsError, match="tokenizer.model"):
        train_tokenizer(["some text"], tiny_tokenizer_dir, vocab_size=32)


def test_build_model_is_seeded_and_takes_overrides(tiny_tokenizer_dir):
    from nemo_merge.models import build_model

    rng_before = torch.random.get_rng_state()
    first = build_model(TINY_CONFIG, tiny_tokenizer_dir, seed=3).state_dict()
    again = build_model(TINY_CONFIG, tiny_tokenizer_dir, seed=3).state_dict()
    other = build_model(TINY_CONFIG, tiny_tokenizer_dir, seed=4).state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["decoder.decoder_layers.0.weight"], other["decoder.decoder_layers.0.weight"])
    small = build_model(TINY_CONFIG, tiny_tokenizer_dir, overrides=["model.encoder.n_layers=1"])
    assert len(small.encoder.layers) == 1 and small.cfg.train_ds.manifest_filepath is None


def test_nemo_tar_layout_and_tokenizer_artifacts(tiny_nemo_base):
    members = nemo_members(tiny_nemo_base)
    assert {"./model_config.yaml", "./model_weights.ckpt"} <= set(members)
    cfg = yaml.safe_load(members["./model_config.yaml"])
    assert cfg["target"] == "nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE"
    # the tokenizer files travel inside the tar as <uuid>_<name>, referenced as nemo:<uuid>_<name>
    for key, name in [("model_path", "tokenizer.model"), ("vocab_path", "vocab.txt"),
                      ("spe_tokenizer_vocab", "tokenizer.vocab")]:
        ref = cfg["tokenizer"][key]
        assert ref.startswith("nemo:") and ref.endswith("_" + name)
        assert "./" + ref[len("nemo:"):] in members
    assert cfg["train_ds"]["manifest_filepath"] is None


def test_base_restores_and_transcribes_the_manifest(tiny_nemo_base, nemo_audio_manifest):
    from nemo.collections.asr.models import ASRModel, EncDecCTCModelBPE
    from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis

    model = ASRModel.restore_from(str(tiny_nemo_base), map_location="cpu")
    assert isinstance(model, EncDecCTCModelBPE)
    assert model.cfg.encoder.d_model == 96 and model.cfg.encoder.subsampling_factor == 8
    files = [str(u.audio) for u in read_nemo_manifest(nemo_audio_manifest)]
    hyps = model.transcribe(files, batch_size=4, num_workers=0, verbose=False)
    # NeMo 3.0: a list of Hypothesis, one per file, in order; the text is in .text
    assert len(hyps) == len(files)
    assert all(isinstance(h, Hypothesis) and isinstance(h.text, str) for h in hyps)


def test_experts_are_trained_copies_of_the_base(tiny_nemo_base, tiny_nemo_experts):
    base = nemo_state(tiny_nemo_base)
    experts = [nemo_state(path) for path in tiny_nemo_experts]
    trained = [k for k, v in base.items() if v.is_floating_point() and not k.startswith("preprocessor.")]
    counters = [k for k in base if k.endswith("num_batches_tracked")]
    assert counters and trained
    for expert in experts:
        assert expert.keys() == base.keys()
        assert all(expert[k].shape == base[k].shape and expert[k].dtype == base[k].dtype for k in base)
        assert all(torch.isfinite(expert[k]).all() for k in trained)
        changed = [k for k in trained if not torch.equal(expert[k], base[k])]
        assert len(changed) > 0.9 * len(trained), sorted(set(trained) - set(changed))
        for k in counters:
            assert int(base[k]) == 0 and int(expert[k]) == EXPERT_STEPS, k
    first, second = experts
    assert any(not torch.equal(first[k], second[k]) for k in trained)
