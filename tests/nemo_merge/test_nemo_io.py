"""Merging real ``.nemo`` experts through the core engine."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from merge_core import Recipe, merge
from merge_core.errors import CheckpointError, TensorMismatchError

pytest.importorskip("nemo.collections.asr")
from nemo_merge.nemo_io import read_nemo_provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def members(path: Path) -> dict[str, bytes]:
    """Every file member of a .nemo, by name (read with tarfile, not our reader)."""
    with tarfile.open(path, "r:*") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(members(path)["./model_weights.ckpt"]), weights_only=True)


def rewrite(src: Path, dest: Path, replace: dict[str, bytes] | None = None, add: list[tarfile.TarInfo] = ()) -> Path:
    """A copy of the archive ``src`` with some members' bytes replaced and extra members added."""
    replace = replace or {}
    with tarfile.open(src, "r:*") as tin, tarfile.open(dest, "w:") as tout:
        for m in tin.getmembers():
            data = replace.get(m.name)
            if data is not None:
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
            else:
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
        for info in add:
            tout.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return dest


def average_recipe(base: Path, experts: list[Path], out: Path, **fields) -> Recipe:
    return Recipe.from_mapping(
        {"method": "average", "base_model": str(base), "models": [str(e) for e in experts], "output": str(out), **fields}
    )


@pytest.fixture(scope="module")
def merged_nemo(tmp_path_factory, tiny_nemo_base, tiny_nemo_experts) -> Path:
    out = tmp_path_factory.mktemp("merged") / "aode.nemo"
    merge(average_recipe(tiny_nemo_base, tiny_nemo_experts, out), progress=False)
    return out


def test_merged_weights_are_the_hand_computed_average(merged_nemo, tiny_nemo_base, tiny_nemo_experts):
    got, base = weights(merged_nemo), weights(tiny_nemo_base)
    a, b = (weights(e) for e in tiny_nemo_experts)
    assert set(got) == set(base)
    changed = 0
    for name, tensor in got.items():
        assert tensor.dtype == base[name].dtype, name
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, rtol=0, atol=1e-6, msg=name)
            changed += not torch.equal(tensor, base[name])
        else:
            # num_batches_tracked: an integer, the base's, never averaged
            assert torch.equal(tensor, base[name]), name
    assert changed > 50  # the experts really moved away from the base
    tracked = [n for n in got if n.endswith("num_batches_tracked")]
    assert tracked and all(int(got[n]) == int(base[n]) != int(a[n]) for n in tracked)


def test_merged_archive_is_the_base_with_new_weights_and_provenance(merged_nemo, tiny_nemo_base, tiny_nemo_experts):
    got, base = members(merged_nemo), members(tiny_nemo_base)
    assert set(got) == set(base) | {"./asr_merge_provenance.json"}
    for name, data in base.items():
        if name != "./model_weights.ckpt":
            assert got[name] == data, f"{name} must be copied untouched"
    record = read_nemo_provenance(merged_nemo)
    assert record["method"] == "average"
    assert [i["path"] for i in record["inputs"]] == [str(tiny_nemo_base), *map(str, tiny_nemo_experts)]
    assert all(n.endswith("num_batches_tracked") for n in record["tensors"]["copied_non_float"])


def test_merged_nemo_restores_and_transcribes(merged_nemo, nemo_audio_manifest):
    from nemo.collections.asr.models import ASRModel

    from merge_core.evaluation.manifests import read_nemo_manifest

    model = ASRModel.restore_from(str(merged_nemo), map_location="cpu").eval()
    audio = [str(u.audio) for u in read_nemo_manifest(nemo_audio_manifest)]
    hypotheses = model.transcribe(audio, batch_size=4, num_workers=0, verbose=False)
    assert len(hypotheses) == len(audio)
    state = model.state_dict()
    merged = weights(merged_nemo)
    assert all(torch.equal(state[k], merged[k]) for k in merged)


def test_ties_of_nemo_experts_restores(tmp_path, tiny_nemo_base, tiny_nemo_experts):
    from nemo.collections.asr.models import ASRModel

    out = tmp_path / "ties.nemo"
    recipe = Recipe.from_mapping(
        {
            "method": "ties",
            "base_model": str(tiny_nemo_base),
            "models": [str(e) for e in tiny_nemo_experts],
            "parameters": {"density": 0.3, "trim_scope": "model"},
            "exclude": ["preprocessor.*"],
            "output": str(out),
        }
    )
    merge(recipe, progress=False)
    model = ASRModel.restore_from(str(out), map_location="cpu")
    base = weights(tiny_nemo_base)
    assert torch.equal(model.state_dict()["preprocessor.featurizer.fb"], base["preprocessor.featurizer.fb"])


def test_member_with_dotdot_is_refused_and_nothing_written(tmp_path, tiny_nemo_base, tiny_nemo_experts):
    evil = tarfile.TarInfo("./../escape.txt")
    evil.size = 4
    bad = rewrite(tiny_nemo_experts[0], tmp_path / "evil.nemo", add=[evil])
    out = tmp_path / "out.nemo"
    with pytest.raises(CheckpointError, match=r"evil.nemo: refusing unsafe archive member '\./\.\./escape.txt' \('\.\.' in its path\)"):
        merge(average_recipe(tiny_nemo_base, [bad, tiny_nemo_experts[1]], out), progress=False)
    assert not out.exists() and not any(".tmp-" in p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "name, kind, linkname, reason",
    [
        ("/etc/evil", tarfile.REGTYPE, "", "absolute path"),
        ("./link", tarfile.SYMTYPE, "../../etc/passwd", "outside the archive"),
        ("./abs_link", tarfile.SYMTYPE, "/etc/passwd", "outside the archive"),
        ("./dev", tarfile.CHRTYPE, "", "device file"),
    ],
)
def test_other_unsafe_members_are_refused(tmp_path, tiny_nemo_base, name, kind, linkname, reason):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, 0
    bad = rewrite(tiny_nemo_base, tmp_path / "bad.nemo", add=[info])
    with pytest.raises(CheckpointError, match=reason):
        merge(average_recipe(bad, [bad, bad], tmp_path / "out.nemo"), progress=False)


class Payload:
    pass


def test_weights_with_a_non_tensor_pickle_are_refused(tmp_path, tiny_nemo_base, tiny_nemo_experts):
    state = weights(tiny_nemo_experts[0])
    buf = io.BytesIO()
    torch.save({**state, "extra": Payload()}, buf)
    bad = rewrite(tiny_nemo_experts[0], tmp_path / "pickled.nemo", replace={"./model_weights.ckpt": buf.getvalue()})
    out = tmp_path / "out.nemo"
    with pytest.raises(CheckpointError, match=r"pickled.nemo \(member model_weights.ckpt\): not a weights-only checkpoint \(it holds a .*Payload"):
        merge(average_recipe(tiny_nemo_base, [bad, tiny_nemo_experts[1]], out), progress=False)
    assert not out.exists()


def test_not_a_tar_and_missing_weights(tmp_path, tiny_nemo_base, tiny_nemo_experts):
    junk = tmp_path / "junk.nemo"
    junk.write_bytes(b"not a tar file" * 100)
    with pytest.raises(CheckpointError, match="junk.nemo: not a .nemo archive"):
        merge(average_recipe(tiny_nemo_base, [junk, junk], tmp_path / "o.nemo"), progress=False)
    no_weights = tmp_path / "noweights.nemo"
    with tarfile.open(tiny_nemo_base) as tin, tarfile.open(no_weights, "w:") as tout:
        for m in tin.getmembers():
            if not m.name.endswith("model_weights.ckpt"):
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
    with pytest.raises(CheckpointError, match="noweights.nemo: .nemo archive lacks model_weights.ckpt"):
        merge(average_recipe(tiny_nemo_base, [no_weights, tiny_nemo_experts[0]], tmp_path / "o.nemo"), progress=False)


def test_expert_with_another_architecture_names_the_key(tmp_path, tiny_nemo_base, tiny_nemo_experts):
    config = yaml.safe_load(members(tiny_nemo_experts[0])["./model_config.yaml"])
    config["encoder"]["conv_kernel_size"] = 31
    other = rewrite(tiny_nemo_experts[0], tmp_path / "other.nemo", replace={"./model_config.yaml": yaml.safe_dump(config).encode()})
    with pytest.raises(TensorMismatchError, match=r"other.nemo: model config differs from .*base.nemo at 'encoder.conv_kernel_size' \(31 vs 9\)"):
        merge(average_recipe(tiny_nemo_base, [other, tiny_nemo_experts[1]], tmp_path / "o.nemo"), progress=False)


def test_nemo_output_needs_a_nemo_base(tmp_path, tiny_nemo_experts):
    st = tmp_path / "w.pt"
    torch.save(weights(tiny_nemo_experts[0]), st)
    with pytest.raises(CheckpointError, match="a .nemo output needs a .nemo base"):
        merge(average_recipe(st, [st, st], tmp_path / "o.nemo"), progress=False)


def test_hydra_script_and_cli_merge_nemo(tmp_path, tiny_nemo_base, tiny_nemo_experts):
    recipe = tmp_path / "aode.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "average",
                "base_model": str(tiny_nemo_base),
                "models": [{"model": str(e), "weight": 1.0} for e in tiny_nemo_experts],
                "include_base": False,
                "output": str(tmp_path / "hydra.nemo"),
            }
        )
    )
    hydra = subprocess.run(
        [sys.executable, "-m", "nemo_merge.merge", "--config-path", str(tmp_path), "--config-name", "aode", "include_base=true", "+base_weight=2.0"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert hydra.returncode == 0, hydra.stderr[-3000:]
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "asr-merge"), "merge", str(recipe), f"output={tmp_path / 'cli.nemo'}", "include_base=true", "base_weight=2.0", "-q"],
        capture_output=True, text=True,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    a, b = weights(tmp_path / "hydra.nemo"), weights(tmp_path / "cli.nemo")
    assert all(torch.equal(a[k], b[k]) for k in a)
    base, (e0, e1) = weights(tiny_nemo_base), [weights(e) for e in tiny_nemo_experts]
    name = "encoder.layers.0.self_attn.linear_q.weight"
    torch.testing.assert_close(a[name], (2 * base[name] + e0[name] + e1[name]) / 4, rtol=0, atol=1e-6)
