"""Fuzzing every config parser: merge recipes of every kind (per-tensor, greedy_soup,
mam, mact), their YAML files and ``key=value`` overrides, evaluation configs, and the
NeMo JSONL and SpeechBrain CSV manifests.

Each example starts from a valid config or manifest and changes one or two values
(wrong types, None, nested containers, huge numbers, NaN/inf, unknown keys), or
replaces the file by something that is not a mapping, not UTF-8, deeply nested or an
alias bomb. The parser either accepts it with sane values, or refuses it with the
project's own error naming the file (or the key), within bounded time and memory,
writing nothing (the helpers in :mod:`tests.hardening.test_fuzz_checkpoints`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from merge_core.errors import ManifestError
from merge_core.evaluation.manifests import read_nemo_manifest, read_speechbrain_csv
from merge_core.evaluation.runner import EvalConfig
from merge_core.recipes import load_recipe_config, parse_recipe
from tests.hardening.test_fuzz_checkpoints import (
    example_dir,
    json_values,
    laughs,
    nested,
    outcome,
    private_system_tmp,  # noqa: F401  (fixture)
)

odd_values = json_values | st.sampled_from(
    [math.nan, math.inf, -math.inf, 2**64, -1, 0, 10**30, "", [], {}, "1e-3", "256MiB", "true"]
)


def set_path(config: Any, path: list[Any], value: Any) -> None:
    """``config[path[0]][path[1]]... = value`` (None: delete), creating mappings on the way."""
    for key in path[:-1]:
        if isinstance(config, list) and (not isinstance(key, int) or key >= len(config)):
            return
        config = config[key] if isinstance(config, list) else config.setdefault(key, {})
        if not isinstance(config, (dict, list)):
            return
    if isinstance(config, list):
        if isinstance(path[-1], int) and path[-1] < len(config) and value is not None:
            config[path[-1]] = value
    elif value is None:
        config.pop(path[-1], None)
    else:
        config[path[-1]] = value


# ----------------------------------------------------------------------------- recipes

RECIPES: dict[str, dict[str, Any]] = {
    "average": {
        "method": "average",
        "models": ["a.safetensors", {"model": "b.safetensors", "weight": 2.0}],
        "output": "out.safetensors",
    },
    "ties": {
        "method": "ties",
        "base_model": "base.safetensors",
        "models": ["a.safetensors", "b.safetensors"],
        "parameters": {"density": 0.5, "lambda": 1.0, "trim_scope": "tensor"},
        "overrides": [{"pattern": "enc.*", "parameters": {"density": 0.3}}],
        "include": ["*"],
        "exclude": ["*.num_batches_tracked"],
        "shard_size": "1MiB",
        "allow_nonfinite": False,
        "hash_inputs": True,
        "output": "out",
    },
    "greedy_soup": {
        "method": "greedy_soup",
        "models": ["a.nemo", "b.nemo"],
        "parameters": {"order": "by_dev_wer"},
        "dev": {
            "manifest": "dev.json",
            "max_utterances": 10,
            "subset": "random",
            "seed": 0,
            "batch_size": 4,
            "device": "cpu",
            "normalization": {"lowercase": True},
        },
        "output": "soup.nemo",
    },
    "mam": {
        "method": "mam",
        "target_model": "t.safetensors",
        "source_model": "s.safetensors",
        "name_map": "bert_to_hubert",
        "layers": [0, 1],
        "parameters": {"lambda": [0.5, 0.25], "baseline": "none", "seed": 0},
        "output": "m.safetensors",
        "hash_inputs": True,
    },
    "mact": {
        "method": "mact",
        "toolkit": "nemo",
        "base_model": "base.nemo",
        "runs": 2,
        "seed": 0,
        "ranges": {"lr_scale": [0.6, 1.6], "dropout": [0.0, 0.1]},
        "train": {"max_steps": 1},
        "merge": "average",
        "work_dir": "runs",
        "output": "o.nemo",
    },
}
# where a recipe's values live: top-level keys and the nested ones each kind reads
RECIPE_PATHS = [[k] for k in sorted({k for r in RECIPES.values() for k in r})] + [
    ["parameters", "density"],
    ["parameters", "lambda"],
    ["parameters", "seed"],
    ["parameters", "trim_scope"],
    ["parameters", "order"],
    ["parameters", "baseline"],
    ["parameters", "unknown"],
    ["models", 0],
    ["models", 1],
    ["overrides", 0],
    ["dev", "manifest"],
    ["dev", "max_utterances"],
    ["dev", "subset"],
    ["dev", "batch_size"],
    ["dev", "seed"],
    ["dev", "log"],
    ["dev", "normalization"],
    ["dev", "device"],
    ["ranges", "lr_scale"],
    ["ranges", "unknown"],
    ["layers", 0],
    ["unknown_key"],
    ["dev", "manifest"],
]


@st.composite
def recipes(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(RECIPES)))
    recipe = json.loads(json.dumps(RECIPES[kind]))
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(RECIPE_PATHS) | st.lists(st.text(max_size=6), min_size=1, max_size=2))
        set_path(recipe, path, draw(st.none() | odd_values))
    return recipe


def parsed(source: Any, overrides: list[str] = ()) -> Any:
    """Read and validate (never run) a recipe, as ``asr-merge merge`` does before running it."""
    recipe = parse_recipe(
        load_recipe_config(source, overrides), where=str(source) if isinstance(source, Path) else None
    )
    assert recipe.method in {"average", "ties", "greedy_soup", "mam", "mact"} | set(RECIPES)
    if hasattr(recipe, "to_dict"):  # provenance records it
        json.dumps(recipe.to_dict(), default=str)
    return recipe


@given(recipes())
def test_recipe_mapping(recipe: dict[str, Any]) -> None:
    with example_dir() as d:
        (d / "base.nemo").write_bytes(b"")  # mact checks that its base model exists
        recipe = {k: (str(d / v) if k == "base_model" and v == "base.nemo" else v) for k, v in recipe.items()}
        outcome(
            lambda: parsed(recipe),
            [
                "recipe",
                "parameter",
                "models",
                "overrides",
                "dev",
                "ranges",
                "layers",
                "lambda",
                "name_map",
                "shard_size",
                "method",
                "base",
                "mam",
                "merge",
                "runs",
                "include",
                "exclude",
                "toolkit",
                "output",
                "seed",
                "train",
                "weight",
                "key",
            ],
            [d],
        )


def recipe_file_texts() -> st.SearchStrategy[bytes]:
    return st.one_of(
        recipes().map(lambda r: yaml.safe_dump(r).encode()),
        json_values.map(lambda v: yaml.safe_dump(v).encode()),  # mostly not a mapping
        st.builds(
            lambda lv, w, m: ("method: average\n" + laughs(lv, w, m)).encode(),
            st.integers(3, 9),
            st.integers(2, 9),
            st.booleans(),
        ),
        st.builds(lambda dp, m: ("method: average\n" + nested(dp, m)).encode(), st.integers(1, 1500), st.booleans()),
        st.sampled_from(
            [
                b"method: &x [*x]\n",
                b"&x {method: average, models: *x}\n",
                b"\xff\xfemethod",
                b"method: [\n",
                b"method: average\nmethod: ties\n",
                b"!!python/object/apply:os.system [true]\n",
                b"",
                b"---\n---\n",
                "method: average\nmodels: [é]\n".encode("latin-1"),
                b"method: *undefined\n",
                b"\x00\x01",
            ]
        ),
        st.text(max_size=40).map(str.encode),
        st.binary(max_size=40),
    )


OVERRIDE_KEYS = [
    "models.0.weight",
    "models.1",
    "parameters.density",
    "+parameters.new",
    "",
    "a..b",
    "models[0]",
    "models.99.weight",
    ".x",
    "output",
    "dev.max_utterances",
    "method",
    "+",
    "=",
    "models.-1.model",
]
OVERRIDE_VALUES = [
    "[",
    "&x [*x]",
    "{a: 1",
    "!!python/object/apply:os.system [true]",
    "*nope",
    "",
    "=",
    ".nan",
    "1e400",
    "[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]",
    "\xff",
    "- a\n- b",
    laughs(8, 8, False),
]
overrides = st.lists(
    st.text(max_size=20)
    | st.builds(
        lambda k, v: f"{k}={v}",
        st.sampled_from(OVERRIDE_KEYS) | st.text(max_size=8),
        st.sampled_from(OVERRIDE_VALUES) | odd_values.map(lambda v: yaml.safe_dump(v).strip()),
    ),
    max_size=3,
)


@given(recipe_file_texts())
def test_recipe_file(text: bytes) -> None:
    with example_dir() as d:
        path = d / "recipe.yaml"
        path.write_bytes(text)
        outcome(lambda: parsed(path), [str(path)], [d])


@given(st.sampled_from(["average", "ties", "greedy_soup", "mam"]), overrides.filter(bool))
def test_recipe_overrides(kind: str, items: list[str]) -> None:
    with example_dir() as d:
        path = d / "recipe.yaml"
        path.write_text(yaml.safe_dump(RECIPES[kind]))
        outcome(lambda: parsed(path, items), [str(path)], [d])


@given(recipe_file_texts())
def test_cli_merge_of_a_damaged_recipe(capsys: pytest.CaptureFixture, text: bytes) -> None:
    from merge_core.app.cli import main

    with example_dir() as d:
        path = d / "recipe.yaml"
        path.write_bytes(text)
        capsys.readouterr()
        code, _ = outcome(lambda: main(["merge", str(path), "--quiet"]), [], [d])
        out, err = capsys.readouterr()
        assert code == 2, (code, err)  # the models named by a valid recipe do not exist
        assert err.startswith("asr-merge: error:") and "Traceback" not in out + err, err


# ----------------------------------------------------------------------------- evaluation configs

EVAL_CONFIG: dict[str, Any] = {
    "models": [{"name": "generalist", "model": "g.nemo"}, "expert.nemo", {"pretrained_name": "nvidia/parakeet"}],
    "manifests": {"test_clean": "clean.json", "test_other": "other.json", "noise": "noise.json"},
    "forgetting_sets": ["test_clean", "test_other"],
    "reference_model": "generalist",
    "normalization": {"lowercase": True, "strip_punctuation": True},
    "batch_size": 4,
    "num_workers": 0,
    "max_utterances": 5,
    "max_duration": 20.0,
    "device": "cpu",
    "decoding": {"strategy": "greedy"},
    "output_dir": "out",
    "cache": True,
    "cache_dir": None,
    "toolkit": "nemo",
}
EVAL_PATHS = [[k] for k in EVAL_CONFIG] + [
    ["models", 0],
    ["models", 1],
    ["manifests", "noise"],
    ["forgetting_sets", 0],
    ["normalization", "lowercase"],
    ["normalization", "english"],
    ["normalization", "unknown"],
    ["unknown"],
]


@st.composite
def eval_configs(draw: st.DrawFn) -> Any:
    config = json.loads(json.dumps(EVAL_CONFIG))
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(EVAL_PATHS) | st.lists(st.text(max_size=6), min_size=1, max_size=2))
        set_path(config, path, draw(st.none() | odd_values))
    return config if draw(st.integers(0, 9)) else draw(json_values)


@given(eval_configs())
def test_evaluation_config(config: Any) -> None:
    result, _ = outcome(
        lambda: EvalConfig.from_mapping(config),
        ["evaluation", "model", "manifests", "forgetting", "normalization", "reference_model", "max_duration"],
        [],
    )
    if result is not None:
        assert result.models and len({m.name for m in result.models}) == len(result.models)
        assert all(isinstance(m.name, str) and isinstance(m.model or m.pretrained_name, str) for m in result.models)
        assert set(result.forgetting_sets) <= set(result.manifests) and result.reference_model in {
            m.name for m in result.models
        }
        assert isinstance(result.batch_size, int) and result.batch_size >= 1 and isinstance(result.cache, bool)
        assert isinstance(result.num_workers, int) and result.num_workers >= 0 and isinstance(result.device, str)
        assert result.max_utterances is None or (isinstance(result.max_utterances, int) and result.max_utterances >= 1)
        assert isinstance(result.output_dir, str) and (result.cache_dir is None or isinstance(result.cache_dir, str))
        assert result.decoding is None or isinstance(result.decoding, dict)


# ----------------------------------------------------------------------------- manifests

NEMO_ENTRY = {"audio_filepath": "audio/a.wav", "duration": 1.5, "text": "hello world"}


@st.composite
def nemo_manifests(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        entry: Any = dict(NEMO_ENTRY)
        how = draw(st.sampled_from(["valid", "value", "drop", "not_object", "not_json"]))
        if how == "value":
            entry[draw(st.sampled_from(sorted(NEMO_ENTRY)))] = draw(odd_values)
        elif how == "drop":
            entry.pop(draw(st.sampled_from(sorted(NEMO_ENTRY))))
        elif how == "not_object":
            entry = draw(json_values)
        line = draw(st.text(max_size=20)) if how == "not_json" else json.dumps(entry)
        lines.append(line.replace("\n", " "))
    text = "\n".join(lines) + "\n"
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "latin-1", "utf-16"]))
    data = text.encode(encoding, errors="replace")
    return data + draw(st.binary(max_size=8)) if draw(st.booleans()) else data


@given(nemo_manifests())
def test_nemo_manifest(data: bytes) -> None:
    with example_dir() as d:
        path = d / "manifest.json"
        path.write_bytes(data)
        result, _ = outcome(lambda: read_nemo_manifest(path), [str(path)], [d])
        if result is not None:
            for u in result:
                assert isinstance(u.text, str) and u.audio.is_absolute() == path.is_absolute()
                assert u.duration is None or (math.isfinite(u.duration) and u.duration >= 0)


CSV_HEADER = ["ID", "duration", "wav", "spk_id", "wrd"]
WAVS = [
    "$data_root/a.wav",
    "$data_root/../escape.wav",
    "$data_root/x/../../escape.wav",
    "$data_root/x/../a.wav",
    "$data_root/./a.wav",
    "$data_root",
    "$data_root/..",
    "$other/a.wav",
    "/abs/a.wav",
    "rel/../a.wav",
    "../a.wav",
]


@st.composite
def speechbrain_csvs(draw: st.DrawFn) -> bytes:
    header = list(CSV_HEADER)
    if draw(st.integers(0, 4)) == 0:
        header.remove(draw(st.sampled_from(header)))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for i in range(draw(st.integers(1, 4))):
        row = {"ID": f"u{i}", "duration": "1.5", "wav": "$data_root/a.wav", "spk_id": "1", "wrd": "HELLO"}
        for _ in range(draw(st.integers(0, 2))):
            column = draw(st.sampled_from(CSV_HEADER))
            row[column] = draw(
                st.sampled_from(WAVS)
                if column == "wav"
                else st.sampled_from(["nan", "-1", "inf", "abc", "", "1e400", "u0"]) | st.text(max_size=8)
            )
        cells = [row[c] for c in header]
        if draw(st.integers(0, 5)) == 0:
            cells = cells[: draw(st.integers(0, len(cells)))] + draw(st.lists(st.text(max_size=3), max_size=2))
        writer.writerow(cells)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "latin-1"]))
    data = buf.getvalue().encode(encoding, errors="replace")
    return data + draw(st.binary(max_size=8)) if draw(st.booleans()) else data


@given(speechbrain_csvs(), st.sampled_from(["/data/root", "data", ".", "/"]))
def test_speechbrain_csv(data: bytes, root: str) -> None:
    with example_dir() as d:
        path = d / "test.csv"
        path.write_bytes(data)
        result, error = outcome(lambda: read_speechbrain_csv(path, {"data_root": root}), [str(path)], [d])
        if error is not None:
            assert isinstance(error, ManifestError)
        if result is not None:
            rows = {r["ID"]: r for r in csv.DictReader(io.StringIO(data.decode("utf-8")), skipinitialspace=True)}
            for u, row in zip(result, rows.values()):
                assert u.duration is None or (math.isfinite(u.duration) and u.duration >= 0)
                if row["wav"].startswith("$data_root"):  # never outside the data root
                    inside = Path(root).absolute().resolve()
                    assert u.audio.resolve() == inside or inside in u.audio.resolve().parents, (row["wav"], u.audio)


def test_csv_row_escaping_the_data_root_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "test.csv"
    path.write_text(
        "ID,duration,wav,spk_id,wrd\nu1,1.0,$data_root/a/../b.wav,1,HI\nu2,1.0,$data_root/../../etc/passwd,1,HI\n"
    )
    with pytest.raises(
        ManifestError, match=rf"{path}:3: wav '\$data_root/\.\./\.\./etc/passwd' leaves \$data_root \(/data\)"
    ):
        read_speechbrain_csv(path, {"data_root": "/data"})
    path.write_text("ID,duration,wav,spk_id,wrd\nu1,1.0,$data_root/a/../b.wav,1,HI\n")  # '..' that stays inside
    assert [os.path.normpath(u.audio) for u in read_speechbrain_csv(path, {"data_root": "/data"})] == ["/data/b.wav"]
