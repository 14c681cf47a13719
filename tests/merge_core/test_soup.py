"""Greedy selective merging (SMAcT, Ducorroy and Riad's Algorithm 1) with a fake dev evaluation
whose answer is known: WER = mean distance of the merged weights to a target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_core.plugins import ToolkitPlugin, register_toolkit, unregister_toolkit
from merge_core.checkpoint.safetensors_io import read_provenance
from merge_core.errors import EvaluationError, RecipeError
from merge_core.recipes.greedy_soup import load_soup_recipe, run_greedy_soup
from merge_core.selection import RunningSoup, Selection, greedy_select, select
from tests.merge_core.conftest import SHAPES, make_state, save_kind

ASR_MERGE = str(Path(sys.executable).parent / "asr-merge")
TARGET = torch.zeros(4)


def distance(state: dict[str, torch.Tensor]) -> float:
    return float((state["w"] - TARGET).abs().mean())


def run(candidates: dict[str, torch.Tensor], order: str = "given") -> Selection:
    fixed = {"step": torch.tensor(7)}
    running = RunningSoup(fixed, {"w": torch.float32, "step": torch.int64})
    return select(list(candidates), lambda c: {"w": candidates[c]}, distance, running, order)


def test_algorithm_1_keeps_only_strict_drops():
    candidates = {
        "m0": torch.ones(4),  # WER 1
        "helpful": -torch.ones(4),  # average with m0 is the target: WER 0, kept
        "harmful": 100 * torch.ones(4),  # average (0 + 100) / 3: rejected
        "neutral": torch.zeros(4),  # average still the target: WER 0 == best, rejected (strict)
        "copy": torch.ones(4),  # average 1/3: rejected
    }
    selection = run(candidates)
    assert selection.kept == ["m0", "helpful"]
    assert [(t.index, t.candidate, t.kept, t.members) for t in selection.trials] == [
        (0, "m0", True, 1), (1, "helpful", True, 2), (2, "harmful", False, 2), (3, "neutral", False, 2), (4, "copy", False, 2)
    ]
    assert [t.wer for t in selection.trials] == pytest.approx([1.0, 0.0, 100 / 3, 0.0, 1 / 3])
    assert [t.best_wer for t in selection.trials] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert torch.equal(selection.state["w"], torch.zeros(4)) and selection.wer == 0.0
    assert selection.state["step"] == 7  # integer buffers are the template's, never averaged


def test_a_candidate_kept_later_joins_the_running_average():
    # m0 = 3, then 0 (avg 1.5, kept), then 6 (avg 3, rejected), then -1.5 (avg 0.5, kept)
    candidates = {"m0": 3 * torch.ones(4), "a": torch.zeros(4), "b": 6 * torch.ones(4), "c": -1.5 * torch.ones(4)}
    selection = run(candidates)
    assert selection.kept == ["m0", "a", "c"]
    assert torch.allclose(selection.state["w"], torch.full((4,), 0.5))


def test_by_dev_wer_starts_from_the_best_candidate():
    candidates = {"far": 10 * torch.ones(4), "near": torch.ones(4), "opposite": -torch.ones(4)}
    selection = run(candidates, order="by_dev_wer")
    assert selection.individual == {"far": 10.0, "near": 1.0, "opposite": 1.0}
    # ties keep the given order: near, opposite, far
    assert [t.candidate for t in selection.trials] == ["near", "opposite", "far"]
    assert selection.kept == ["near", "opposite"] and selection.wer == 0.0


def test_first_wer_is_not_measured_again():
    calls = []
    running = RunningSoup({}, {"w": torch.float32})

    def evaluate(state):
        calls.append(state["w"].clone())
        return distance(state)

    greedy_select(["a", "b"], lambda c: {"w": torch.ones(4)}, evaluate, running, first_wer=1.0)
    assert len(calls) == 1  # only the trial of "b"


def test_nan_wer_is_an_error():
    running = RunningSoup({}, {"w": torch.float32})
    with pytest.raises(EvaluationError, match="no reference words"):
        greedy_select(["a"], lambda c: {"w": torch.ones(4)}, lambda s: float("nan"), running)


# ---------------------------------------------------------------------------
# the recipe, the log and the written soup, with a fake evaluator registered for safetensors

LINEAR = "encoder.layers.0.self_attn.linear_q.weight"


@pytest.fixture
def fake_evaluator():
    """A dev "WER" for safetensors templates: distance of one weight to the base's."""
    target = make_state(0)[LINEAR]
    seen = []

    def factory(template, dev):
        seen.append(dev)
        return lambda state: float((state[LINEAR] - target).abs().mean())

    register_toolkit(ToolkitPlugin(name="fake", extra="fake", dev_evaluators={"safetensors": factory}))
    yield seen
    unregister_toolkit("fake")


def write_recipe(tmp_path: Path, paths: list[Path], extra: str = "") -> Path:
    (tmp_path / "dev.json").write_text("")
    text = "method: greedy_soup\nmodels:\n" + "".join(f"  - {p}\n" for p in paths)
    text += f"dev: {{manifest: {tmp_path / 'dev.json'}, max_utterances: 5, log: {tmp_path / 'trials.json'}}}\n"
    text += f"output: {tmp_path / 'soup.safetensors'}\n" + extra
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    return recipe


@pytest.fixture
def soup_inputs(tmp_path):
    """[m0, destroyed, mirror, copy of m0]: m0 = base + delta, mirror = base - delta."""
    base = make_state(0)
    m0 = make_state(1, base)
    destroyed = {**make_state(2, base), LINEAR: 1000 * base[LINEAR]}
    other = make_state(3, base)  # its integer buffers differ from m0's
    mirror = {n: (2 * base[n].float() - t.float()).to(t.dtype) if t.dtype.is_floating_point else other[n] for n, t in m0.items()}
    states = [m0, destroyed, mirror, dict(m0)]
    return [save_kind(s, tmp_path, f"c{i}", "safetensors") for i, s in enumerate(states)], states


def test_run_writes_the_average_of_the_kept_and_logs_every_trial(tmp_path, fake_evaluator, soup_inputs, capsys):
    paths, states = soup_inputs
    recipe = load_soup_recipe(write_recipe(tmp_path, paths))
    result = run_greedy_soup(recipe, progress=False)
    log = json.loads((tmp_path / "trials.json").read_text())
    assert [(t["candidate"], t["kept"]) for t in log["trials"]] == [
        (str(paths[0]), True), (str(paths[1]), False), (str(paths[2]), True), (str(paths[3]), False)
    ]
    assert log["kept"] == [str(paths[0]), str(paths[2])] and log["trials"][2]["best_wer"] == log["dev_wer"]
    assert log["trials"][1]["wer"] > log["trials"][0]["wer"] > log["trials"][2]["wer"]
    out = load_file(result.output)
    for name, (_, dtype) in SHAPES.items():
        if dtype.is_floating_point:
            expected = ((states[0][name].float() + states[2][name].float()) / 2).to(dtype)
            assert torch.equal(out[name], expected), name
        else:
            assert torch.equal(out[name], states[0][name]), name  # from the first model, not averaged
    provenance = read_provenance(result.output)
    assert provenance["method"] == "greedy_soup" and provenance["tensors"]["selection"]["kept"] == log["kept"]
    assert [i["weight"] for i in provenance["inputs"]] == [1.0, 0.0, 1.0, 0.0]
    printed = capsys.readouterr().out
    assert "dev WER %" in printed and printed.count("\n") >= 5
    assert fake_evaluator[0].max_utterances == 5


def test_merge_command_dispatches_greedy_soups(tmp_path, soup_inputs):
    paths, _ = soup_inputs
    recipe = write_recipe(tmp_path, paths)
    done = subprocess.run([ASR_MERGE, "merge", str(recipe), "-q"], capture_output=True, text=True)
    # no evaluator is registered for safetensors templates: the error says what to do
    assert done.returncode == 2 and "give 'base_model' a .nemo file" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("parameters: {order: best}\n", "parameter 'order' must be one of given, by_dev_wer"),
        ("parameters: {density: 0.2}\n", "accepts only: order"),
        ("include_base: true\n", "'include_base' is not meaningful"),
        ("hash_inputs: 3\n", "'hash_inputs' must be true or false"),
    ],
)
def test_recipe_errors_name_the_file_and_key(tmp_path, soup_inputs, extra, message):
    paths, _ = soup_inputs
    with pytest.raises(RecipeError, match=message) as error:
        load_soup_recipe(write_recipe(tmp_path, paths, extra))
    assert "recipe.yaml" in str(error.value)


def test_dev_section_is_checked(tmp_path, soup_inputs):
    paths, _ = soup_inputs
    recipe = write_recipe(tmp_path, paths)
    with pytest.raises(RecipeError, match="dev.max_utterances must be at least 1"):
        load_soup_recipe(recipe, ["dev.max_utterances=0"])
    with pytest.raises(RecipeError, match="dev.subset"):
        load_soup_recipe(recipe, ["dev.subset=last"])
    with pytest.raises(RecipeError, match="weight: a greedy soup is a uniform average"):
        load_soup_recipe(recipe, ["models.1={model: x.safetensors, weight: 2}"])


def test_dev_subset_first_or_seeded_sample(tmp_path, soup_inputs):
    paths, _ = soup_inputs
    recipe = write_recipe(tmp_path, paths)
    items = list(range(20))
    assert load_soup_recipe(recipe).dev.choose(items) == [0, 1, 2, 3, 4]
    sampled = load_soup_recipe(recipe, ["dev.subset=random", "dev.seed=3"]).dev.choose(items)
    assert sampled == sorted(sampled) and len(sampled) == 5 and sampled != [0, 1, 2, 3, 4]
    assert sampled == load_soup_recipe(recipe, ["dev.subset=random", "dev.seed=3"]).dev.choose(items)


def test_select_and_merge_commands_run_the_same_selection(tmp_path, fake_evaluator, soup_inputs, capsys):
    from merge_core.app.cli import main

    paths, _ = soup_inputs
    recipe = write_recipe(tmp_path, paths)
    assert main(["select", str(recipe), "-q"]) == 0
    first = json.loads((tmp_path / "trials.json").read_text())
    assert "greedy soup of 2 of 4 candidates" in capsys.readouterr().out
    assert main(["merge", "-q", str(recipe), "parameters.order=by_dev_wer"]) == 0
    second = json.loads((tmp_path / "trials.json").read_text())
    assert sorted(second["kept"]) == sorted(first["kept"]) and set(second["individual"]) == {str(p) for p in paths}
    assert "greedy soup of 2 of 4 candidates" in capsys.readouterr().out


def test_example_recipe_is_valid():
    recipe = load_soup_recipe(Path(__file__).resolve().parents[2] / "configs" / "recipes" / "example_greedy_soup.yaml")
    assert recipe.order == "given" and recipe.dev.max_utterances == 200 and len(recipe.candidates.models) == 4
    assert recipe.candidates.base_model == "models/nemo_generalist.nemo" and not recipe.candidates.selects("preprocessor.x")
