"""Merging real SpeechBrain ``Checkpointer`` folders through the core engine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merge_core import Recipe, load_recipe, merge
from merge_core.checkpoint import open_checkpoint
from merge_core.errors import CheckpointError, TensorMismatchError
from tests.merge_core import reference
from tests.speechbrain_merge.conftest import SENTENCES

pytest.importorskip("speechbrain")
from speechbrain.utils.checkpoints import Checkpointer, average_checkpoints  # noqa: E402

from speechbrain_merge.checkpoint_io import read_checkpointer_provenance  # noqa: E402
from speechbrain_merge.merge import main as merge_main  # noqa: E402
from speechbrain_merge.recipes.train_ctc import build_brain, csv_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NOT_MERGED = {"optimizer", "scheduler", "counter", "brain", "dataloader-TRAIN", "normalizer"}


def state(folder: Path, recoverable: str = "model") -> dict[str, torch.Tensor]:
    return torch.load(folder / f"{recoverable}.ckpt", weights_only=True)


def recipe(method: str, models: list[Path], output: Path, base: Path | None = None, **fields) -> Recipe:
    raw = {"method": method, "models": [str(m) for m in models], "output": str(output), **fields}
    return Recipe.from_mapping({**raw, "base_model": None if base is None else str(base)})


def leftovers(folder: Path) -> list[str]:
    """Everything in ``folder``: after a failed merge, no output and no temporary file."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def averaged(tmp_path_factory, sb_generalist) -> Path:
    """``save/CKPT+avg`` beside copies of the generalist's three checkpoints: their
    uniform average, the latest as base (its other recoverables are copied)."""
    save = tmp_path_factory.mktemp("sb_avg") / "save"
    shutil.copytree(sb_generalist.last.parent, save)
    inputs = [save / p.name for p in sb_generalist.checkpoints]
    merge(recipe("average", inputs, save / "CKPT+avg", base=inputs[-1]), progress=False)
    return save / "CKPT+avg"


def test_importing_the_adapter_imports_no_speechbrain():
    code = (
        "import sys, speechbrain_merge;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('speechbrain', 'hyperpyyaml'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_reader_namespaces_the_tensor_recoverables(sb_generalist):
    with open_checkpoint(sb_generalist.last) as reader:
        assert reader.kind == "speechbrain-checkpointer"
        assert list(reader.merged) == ["model"]
        assert set(reader.copied) == NOT_MERGED
        stored = state(sb_generalist.last)
        assert reader.keys() == [f"model.{k}" for k in stored]
        for key, tensor in stored.items():
            assert torch.equal(reader.get(f"model.{key}"), tensor)


def test_uniform_average_equals_speechbrains_average_checkpoints(sb_generalist, averaged):
    checkpoints = Checkpointer(sb_generalist.last.parent).find_checkpoints(max_num_checkpoints=3)
    assert sorted(c.path for c in checkpoints) == sorted(sb_generalist.checkpoints)
    theirs = average_checkpoints(checkpoints, recoverable_name="model")
    ours, base = state(averaged), state(sb_generalist.last)
    assert list(ours) == list(theirs)
    moved = 0
    for name, tensor in ours.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, theirs[name], rtol=1e-6, atol=1e-8, msg=name)
            moved += not torch.allclose(tensor, base[name], rtol=1e-6, atol=1e-8)
        else:  # SpeechBrain averages integer buffers into floats; they are copied from the base
            assert torch.equal(tensor, base[name]), name
    assert moved > len(ours) // 2, "the checkpoints barely differ: the comparison would prove nothing"


def test_the_checkpointer_picks_the_merged_folder_as_the_latest(averaged):
    assert Checkpointer(averaged.parent).find_checkpoint().path == averaged  # what recover_if_possible() loads


def test_merged_folder_keeps_the_base_recoverables_and_records_provenance(sb_generalist, averaged):
    for name in NOT_MERGED:
        assert (averaged / f"{name}.ckpt").read_bytes() == (sb_generalist.last / f"{name}.ckpt").read_bytes()
    meta = yaml.safe_load((averaged / "CKPT.yaml").read_text())
    assert meta["end-of-epoch"] is True and "WER" not in meta
    provenance = read_checkpointer_provenance(averaged)
    assert provenance["method"] == "average" and set(provenance["copied_recoverables"]) == NOT_MERGED
    inputs = [i["path"] for i in provenance["inputs"] if i["role"] == "model"]
    assert inputs == [str(averaged.parent / p.name) for p in sb_generalist.checkpoints]
    assert all(f["sha256"] and len(f["sha256"]) == 64 for i in provenance["inputs"] for f in i["files"])


def test_asr_merge_cli_reads_and_writes_checkpoint_folders(tmp_path, sb_generalist):
    out = tmp_path / "save" / "CKPT+cli"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        yaml.safe_dump({"method": "average", "models": [str(p) for p in sb_generalist.checkpoints], "output": str(out)})
    )
    done = subprocess.run(
        [sys.executable, "-m", "merge_core.app.cli", "merge", str(recipe_file), "-q"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert Checkpointer(out.parent).find_checkpoint().path == out


def test_speechbrain_style_script_reports_bad_input(tmp_path, capsys):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({"method": "average", "models": [str(tmp_path / "nope")], "output": "x"}))
    assert merge_main([str(recipe_file), f"--output={tmp_path / 'save' / 'CKPT+x'}"]) == 2
    assert f"{tmp_path / 'nope'}: no such file or folder" in capsys.readouterr().err
    assert leftovers(tmp_path / "save") == []


def test_speechbrain_style_script_applies_overrides(tmp_path, sb_generalist, sb_experts):
    out = tmp_path / "save" / "CKPT+ta"
    recipe_file = tmp_path / "recipe.yaml"
    experts = [run.last for run in sb_experts]
    recipe_file.write_text(
        yaml.safe_dump(
            {
                "method": "task_arithmetic",
                "base_model": str(sb_generalist.last),
                "models": [{"model": str(e)} for e in experts],
            }
        )
    )
    assert merge_main([str(recipe_file), f"--output={out}", "--parameters.lambda=0.5", "--models.1.weight=2"]) == 0
    base, merged = state(sb_generalist.last), state(out)
    for name, tensor in merged.items():
        if tensor.is_floating_point():
            expected = reference.task_arithmetic(base[name], [state(e)[name] for e in experts], [1.0, 2.0], 0.5)
            torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
    assert read_checkpointer_provenance(out)["parameters"] == {"lambda": 0.5}


@pytest.mark.parametrize("method, parameters", [("ties", {"density": 0.5}), ("task_arithmetic", {"lambda": 1.0})])
def test_merged_experts_recover_with_the_checkpointer_and_decode(
    tmp_path, sb_data, sb_hparams, sb_generalist, sb_experts, method, parameters
):
    out = tmp_path / "save" / f"CKPT+{method}"
    experts = [run.last for run in sb_experts]
    merge(recipe(method, experts, out, base=sb_generalist.last, parameters=parameters), progress=False)

    hparams = sb_hparams(tmp_path, tokenizer_folder=str(sb_generalist.output_folder / "tokenizer"))
    brain = build_brain(hparams, {"device": "cpu", "noprogressbar": True})
    assert brain.checkpointer.find_checkpoint().path == out  # what recover_if_possible() picks
    brain.evaluate(csv_dataset(str(sb_data.test_clean_csv), hparams, brain.tokenizer), progressbar=False)

    for name, tensor in hparams["model"].state_dict().items():
        assert torch.equal(tensor, state(out)[name]), name
    if method == "ties":
        base = state(sb_generalist.last)
        for name, tensor in state(out).items():
            expected = reference.ties(base[name], [state(e)[name] for e in experts], [1.0, 1.0], 1.0, 0.5)
            torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
    hypotheses = [s["hyp_tokens"] for s in brain.wer_metric.scores]
    assert len(hypotheses) == len(SENTENCES)
    assert sum(h != [""] for h in hypotheses) >= len(hypotheses) // 2, hypotheses


def test_custom_objects_are_copied_never_unpickled(tmp_path, sb_generalist):
    folder = tmp_path / "CKPT+custom"
    shutil.copytree(sb_generalist.last, folder)
    torch.save({"object": Path("not/a/tensor")}, folder / "custom.ckpt")  # needs a full unpickler
    with open_checkpoint(folder) as reader:
        assert "custom" in reader.copied and "custom" not in reader.merged


def not_checkpoints(tmp_path: Path, sb_generalist) -> dict[str, tuple[Path, str]]:
    save = sb_generalist.last.parent
    headless = tmp_path / "CKPT+headless"
    shutil.copytree(sb_generalist.last, headless)
    (headless / "CKPT.yaml").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "save folder": (save, "name one of them"),
        "no meta": (headless, "no CKPT.yaml"),
        "empty folder": (empty, "not a checkpoint this tool can read"),
    }


@pytest.mark.parametrize("case", ["save folder", "no meta", "empty folder"])
def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path, sb_generalist, case):
    path, message = not_checkpoints(tmp_path / "inputs", sb_generalist)[case]
    out_dir = tmp_path / "out"
    with pytest.raises(CheckpointError, match=message) as error:
        merge(recipe("average", [sb_generalist.last, path], out_dir / "CKPT+x"), progress=False)
    assert str(path) in str(error.value)
    assert leftovers(out_dir) == []


def test_experts_with_different_recoverables_are_refused(tmp_path, sb_generalist, sb_experts):
    odd = tmp_path / "CKPT+odd"
    shutil.copytree(sb_experts[1].last, odd)
    (odd / "normalizer.ckpt").unlink()
    shutil.copyfile(odd / "counter.ckpt", odd / "lm.ckpt")
    out_dir = tmp_path / "out"
    with pytest.raises(TensorMismatchError, match=r"recoverables differ .*missing \['normalizer'\]; extra \['lm'\]"):
        merge(recipe("ties", [sb_experts[0].last, odd], out_dir / "CKPT+x", base=sb_generalist.last), progress=False)
    assert leftovers(out_dir) == []


def test_a_corrupt_recoverable_is_refused_naming_it(tmp_path, sb_generalist):
    broken = tmp_path / "CKPT+broken"
    shutil.copytree(sb_generalist.last, broken)
    data = (broken / "model.ckpt").read_bytes()
    (broken / "model.ckpt").write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    with pytest.raises(CheckpointError, match="model.ckpt: unreadable or corrupt"):
        merge(recipe("average", [sb_generalist.last, broken], out_dir / "CKPT+x"), progress=False)
    assert leftovers(out_dir) == []


def test_example_recipe_is_valid():
    recipe = load_recipe(REPO / "configs" / "recipes" / "aode_speechbrain.yaml")
    assert recipe.include == ("model.*",) and Path(recipe.output).name.startswith("CKPT+")
