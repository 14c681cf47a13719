"""The attention-only example recipe for SpeechBrain, run as shipped on the tiny Conformer's
checkpoints: the packed Q, K, V tensors follow task arithmetic, every other tensor the average."""

from __future__ import annotations

import pytest

from tests.recipe_examples import average, check_tensors, merge_example, task_arithmetic

pytest.importorskip("speechbrain")

LAYERS = 2  # configs/speechbrain/tiny_ctc.yaml: one in_proj_weight (Q, K, V) in each


def test_task_vectors_of_the_attention_the_rest_averaged(tmp_path, sb_generalist, sb_experts):
    out = tmp_path / "save" / "CKPT+attention_tv"
    experts = [run.last for run in sb_experts]
    recipe = merge_example("example_attention_task_vectors_speechbrain", sb_generalist.last, experts, out)
    assert recipe.parameters["lambda"] == 1 / len(experts)  # what makes the rest the average
    lam = recipe.overrides[0].parameters["lambda"]
    assert check_tensors(out, sb_generalist.last, experts, attention=task_arithmetic(lam), rest=average) == LAYERS
