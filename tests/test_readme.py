"""The README's commands are tests: its "Your own data, end to end" section, run as written
on the smoke corpus (one epoch per expert), then every recipe template under
``configs/recipes/`` and the disk-usage option, from a copy of the repository's
``configs/``, ``models/`` and ``examples/``.

The toolkit configs the section does not name are run elsewhere: ``tiny_ctc*.yaml`` and
``fastconformer_ctc_bpe_tiny.yaml`` build the test fixtures, ``tiny_hubert_ctc.yaml`` the
L-MAM tests, ``whisper_*.yaml`` the Whisper demo's smoke test.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("nemo.collections.asr")
pytest.importorskip("speechbrain")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Your own data, end to end"
ROWS = ["generalist", "FT accented", "FT noisy", "AoDE", "TIES"]


def section_blocks(readme: str, heading: str) -> list[str]:
    """The ```bash blocks between ``heading`` and the next second-level heading."""
    start = readme.index(heading)
    end = readme.find("\n## ", start + len(heading))
    return re.findall(r"```bash\n(.*?)```", readme[start : end if end > 0 else None], flags=re.S)


def run(command: str, cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "EPOCHS": "1"}
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def checked(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])
    return done


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    for folder in ("configs", "models", "examples"):
        shutil.copytree(REPO / folder, root / folder)
    return root


@pytest.fixture(scope="module")
def own_data(workspace: Path) -> float:
    """Runs the section's blocks in order, as one shell script; returns its wall time."""
    blocks = section_blocks((REPO / "README.md").read_text(encoding="utf-8"), SECTION)
    assert len(blocks) >= 6  # data, manifests, NeMo experts and merges, SpeechBrain experts and merges
    start = time.perf_counter()
    checked(run("\n".join(blocks), workspace))
    return time.perf_counter() - start


@pytest.mark.parametrize("report", ["outputs/eval", "outputs/eval_sb"])
def test_the_section_runs_as_written_and_reports_every_model(own_data, workspace, report):
    folder = workspace / report
    data = json.loads((folder / "report.json").read_text())
    assert [m["name"] for m in data["models"]] == ROWS
    assert all(math.isfinite(w) for m in data["models"] for w in m["wer"].values())
    assert data["models"][0]["forgetting_pct"] == 0.0 and (folder / "report.png").stat().st_size > 10_000
    assert "Utterances per set: accented 6" in (folder / "report.md").read_text()
    print(f"README section: {own_data:.0f} s")


def test_experts_hold_what_a_merge_needs(own_data, workspace):
    from merge_core.checkpoint import open_checkpoint

    expert = workspace / "results" / "experts" / "noisy" / "expert" / "CKPT+expert"
    assert sorted(p.name for p in expert.iterdir()) == ["CKPT.yaml", "model.ckpt", "normalizer.ckpt"]
    with open_checkpoint(expert) as e, open_checkpoint(workspace / "models" / "speechbrain_generalist" / "CKPT+generalist") as g:
        assert e.keys() == g.keys()
    nemo = workspace / "outputs" / "experts" / "noisy"
    assert {"expert.nemo", "expert_best.nemo"} <= {p.name for p in nemo.iterdir()}
    assert len(list(nemo.rglob("*.ckpt"))) >= 1  # exp_manager's, as the README says


def test_evaluation_leaves_the_terminal_to_the_progress_bar(own_data, workspace):
    done = checked(run("asr-merge eval configs/nemo/eval.yaml cache=false output_dir=outputs/eval_quiet", workspace))
    assert "NeMo W" not in done.stderr and "NeMo I" not in done.stdout, done.stderr[-3000:]
    assert "evaluate: 100%" in done.stderr and "| AoDE |" in done.stdout
    assert "NeMo" in (workspace / "outputs" / "eval_quiet" / "eval.log").read_text()


def test_the_disk_saving_overrides_keep_only_the_expert(own_data, workspace):
    lean = ("exp_manager=null trainer.callbacks.2.path=null trainer.callbacks.3.dirpath=null")
    checked(run(
        "python -m nemo_merge.finetune --config-path configs/nemo --config-name finetune_expert name=lean "
        "init_from_nemo_model=models/nemo_generalist.nemo model.train_ds.manifest_filepath=data/manifests/noisy/train.json "
        f"model.validation_ds.manifest_filepath=data/manifests/noisy/dev.json trainer.max_epochs=1 {lean}",
        workspace,
    ))
    assert [p.name for p in (workspace / "outputs" / "experts" / "lean").rglob("*") if p.is_file()] == ["expert.nemo"]


# each template under configs/recipes/ as shipped (MAcT with 2 runs of one epoch, for time)
TEMPLATES = [
    ("asr-merge merge configs/recipes/example_average.yaml", "outputs/example_average.safetensors"),
    ("asr-merge merge configs/recipes/example_ties.yaml", "outputs/example_ties.safetensors"),
    ("asr-merge merge configs/recipes/example_dare_ties.yaml", "outputs/example_dare_ties.safetensors"),
    ("asr-merge merge configs/recipes/example_attention_task_vectors_nemo.yaml", "outputs/attention_task_vectors.nemo"),
    ("asr-merge merge configs/recipes/example_attention_interpolation_nemo.yaml", "outputs/attention_interpolation.nemo"),
    ("asr-merge merge configs/recipes/example_attention_task_vectors_speechbrain.yaml",
     "results/merged/CKPT+attention_task_vectors"),
    ("asr-merge mact configs/recipes/example_mact_nemo.yaml runs=2 train.overrides.3=trainer.max_epochs=1",
     "outputs/mact/noisy.nemo"),
    ("asr-merge select configs/recipes/example_greedy_soup.yaml", "outputs/greedy_soup.nemo"),
    ("asr-merge mact configs/recipes/example_mact_speechbrain.yaml runs=2 train.overrides.number_of_epochs=1",
     "outputs/mact/CKPT+noisy-sb"),
    # 4 trials (the 3 fixed recipes and one drawn); one-epoch experts on 12 utterances may keep no trial
    # within 1 %: the least-forgetting one is written then
    ("asr-merge search configs/recipes/example_search_nemo.yaml trials=4 if_infeasible=least_forgetting",
     "outputs/search.nemo"),
    ("asr-merge search configs/recipes/example_search_speechbrain.yaml trials=4 if_infeasible=least_forgetting",
     "results/merged/CKPT+search"),
]


def test_every_recipe_template_runs_as_shipped(own_data, workspace):
    shipped = sorted(p.name for p in (REPO / "configs" / "recipes").glob("*.yaml"))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    covered = {re.search(r"configs/recipes/(\S+\.yaml)", c).group(1) for c, _ in TEMPLATES}
    covered |= set(re.findall(r"configs/recipes/(\S+\.yaml)", "".join(section_blocks(readme, SECTION))))
    covered |= {f"{name}.yaml" for name in re.findall(r"--config-path configs/recipes --config-name (\w+)", "".join(section_blocks(readme, SECTION)))}
    assert sorted(covered) == shipped
    # two at a time (each is mostly one process's imports); the greedy soup last: its candidates are MAcT's runs
    last = [t for t in TEMPLATES if "greedy_soup" in t[0]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda t: run(t[0], workspace), [t for t in TEMPLATES if t not in last]))
    done += [run(command, workspace) for command, _ in last]
    for (command, output), result in zip([t for t in TEMPLATES if t not in last] + last, done):
        checked(result)
        assert (workspace / output).exists(), command
