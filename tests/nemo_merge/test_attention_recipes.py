"""The attention-only example recipes for NeMo, run as shipped on the tiny FastConformer's
checkpoints: the Q, K, V tensors follow the recipe's equation, every other tensor the average
or the base, as its comments say."""

from __future__ import annotations

import pytest

from tests.recipe_examples import average, base, check_tensors, is_qkv, merge_example, task_arithmetic

pytest.importorskip("nemo.collections.asr")

LAYERS = 3  # configs/nemo/fastconformer_ctc_bpe_tiny.yaml: linear_{q,k,v}.{weight,bias} in each


def test_task_vectors_of_the_attention_the_rest_averaged(tmp_path, tiny_nemo_base, tiny_nemo_experts):
    out = tmp_path / "attention_tv.nemo"
    recipe = merge_example("example_attention_task_vectors_nemo", tiny_nemo_base, tiny_nemo_experts, out)
    assert recipe.parameters["lambda"] == 1 / len(tiny_nemo_experts)  # what makes the rest the average
    lam = recipe.overrides[0].parameters["lambda"]
    distinct = check_tensors(out, tiny_nemo_base, tiny_nemo_experts, attention=task_arithmetic(lam), rest=average,
                             copied=lambda name: name.startswith("preprocessor."))
    assert distinct == LAYERS * 6


def test_attention_interpolation_keeps_the_rest_of_the_base(tmp_path, tiny_nemo_base, tiny_nemo_experts):
    out = tmp_path / "attention_interpolation.nemo"
    recipe = merge_example("example_attention_interpolation_nemo", tiny_nemo_base, tiny_nemo_experts[:1], out)
    lam = recipe.parameters["lambda"]

    def interpolation(theta_0, thetas):  # MAM's Eq. 1, the expert as the source
        return lam * thetas[0] + (1 - lam) * theta_0

    distinct = check_tensors(out, tiny_nemo_base, tiny_nemo_experts[:1], attention=interpolation, rest=base,
                             copied=lambda name: not is_qkv(name))
    assert distinct == LAYERS * 6
