"""RegMean on real SpeechBrain ``CKPT+`` experts: Gram files by ``asr-merge grams`` through
the inference interface's own ``encode_batch`` on espeak-ng speech, checked against a
hand recomputation, then merged by ``asr-merge merge`` into a folder that decodes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_core.app.cli import main
from merge_core.checkpoint import open_checkpoint
from merge_core.evaluation.runner import ModelSpec
from merge_core.grams import gram_path, read_record
from tests.speechbrain_merge.conftest import INFERENCE_HPARAMS, tokenizer_file

pytest.importorskip("speechbrain")
from speechbrain_merge.evaluate import SpeechBrainBackend, load_interface, padded_batch  # noqa: E402
from speechbrain_merge.grams import speechbrain_options  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "speechbrain" / "grams.yaml"
BATCH = 3  # 8 utterances: batches of 3, 3 and 2, padded to their longest
FIRST, HEAD = "model.1.custom_src_module.layers.0.w.weight", "model.2.w.weight"  # first and last linear layers
FEED_FORWARD = "model.1.encoder.layers.0.ffn_module1.1.ffn.0.weight"  # its inputs are time-major


def speechbrain_keys(sb_data, sb_generalist) -> dict:
    """The SpeechBrain keys the tiny models take."""
    return {
        "hparams": str(INFERENCE_HPARAMS),
        "hparams_overrides": {"tokenizer_file": str(tokenizer_file(sb_generalist))},
        "data_root": str(sb_data.data_root),
    }


@pytest.fixture(scope="module")
def experts(tmp_path_factory, sb_data, sb_generalist, sb_experts) -> list[Path]:
    """Copies of the two experts' last checkpoints, each with its Gram file by ``asr-merge grams``
    on a domain of its own: the clean voices for the first, the other voices for the second."""
    folder = tmp_path_factory.mktemp("regmean_sb") / "save"
    keys = [f"{k}={json.dumps(v)}" for k, v in speechbrain_keys(sb_data, sb_generalist).items()]
    copies = []
    for i, (run, manifest) in enumerate(zip(sb_experts, (sb_data.train_csv, sb_data.test_other_csv))):
        copy = Path(shutil.copytree(run.last, folder / f"CKPT+expert{i}"))
        command = ["grams", str(CONFIG), f"model={copy}", f"manifest={manifest}", f"batch_size={BATCH}", "batches=null"]
        assert main([*command, "device=cpu", *keys, "-q"]) == 0
        copies.append(copy)
    return copies


def test_grams_equal_a_hand_recomputation_on_the_same_padded_batches(experts, sb_data, sb_generalist, tmp_path):
    """No hook: the same batches through the encoder's modules one by one; the first linear
    layer's input (the CNN's output, flattened) and the CTC head's (the transformer's
    output) kept where t < round(relative length * T), SpeechBrain's own masking."""
    options = speechbrain_options(speechbrain_keys(sb_data, sb_generalist))
    asr = load_interface(ModelSpec("expert", model=str(experts[0])), options, tmp_path, "cpu")
    encoder = asr.mods.encoder
    utterances = SpeechBrainBackend(options, tmp_path).read_manifest(sb_data.train_csv)
    sums = {FIRST: 0, HEAD: 0}
    frames, padded = 0, 0
    with torch.no_grad():
        for start in range(0, len(utterances), BATCH):
            wavs, lengths = padded_batch(asr, utterances[start : start + BATCH])
            x = encoder.normalize(encoder.compute_features(wavs), lengths)
            cnn = encoder.CNN(x)
            inputs = {FIRST: cnn.reshape(*cnn.shape[:2], -1), HEAD: encoder.transformer_encoder(cnn, lengths)}
            for name, value in inputs.items():
                real = torch.arange(value.shape[1]) < torch.round(lengths * value.shape[1])[:, None]
                rows = value[real].double()
                sums[name] = sums[name] + rows.T @ rows
            frames, padded = frames + int(real.sum()), padded + real.numel()  # FIRST's and HEAD's frames are the same
    got = load_file(gram_path(experts[0]))
    record = read_record(gram_path(experts[0]))
    assert record["batches"] == 3 and record["utterances"] == 8 and record["skipped"] == {}
    assert record["rows"][FIRST] == record["rows"][HEAD] == record["rows"][FEED_FORWARD] == frames
    assert frames < padded
    for name, total in sums.items():
        torch.testing.assert_close(got[name].double(), total / frames, rtol=2e-4, atol=2e-5, msg=name)
    # bare-parameter projections (RelPosMHAXL.in_proj_weight) have no module to hook: no Gram
    assert not any("in_proj" in n for n in got) and len(got) == 2 + 2 * 8


def test_regmean_merge_of_two_experts_decodes(experts, sb_data, sb_generalist, tmp_path):
    out = tmp_path / "save" / "CKPT+regmean"
    recipe = tmp_path / "regmean.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"method": "regmean", "models": [str(e) for e in experts], "parameters": {"alpha": 0.5}, "output": str(out)}
        )
    )
    assert main(["merge", str(recipe), "-q"]) == 0
    options = speechbrain_options(speechbrain_keys(sb_data, sb_generalist))
    asr = load_interface(ModelSpec("regmean", model=str(out)), options, tmp_path / "work", "cpu")
    utterances = SpeechBrainBackend(options, tmp_path).read_manifest(sb_data.test_clean_csv)
    words, _ = asr.transcribe_batch(*padded_batch(asr, utterances))
    assert len(words) == len(utterances)
    # the CTC head is the closed form of the experts' Gram files; the experts are one epoch
    # apart, so it is near their average: compare at float32's precision
    lhs, rhs, average = 0, 0, 0
    for expert in experts:
        gram = load_file(gram_path(expert))[HEAD].double()
        reduced = 0.5 * gram + 0.5 * torch.diag(gram.diagonal())
        with open_checkpoint(expert) as reader:
            weight = reader.get(HEAD).double()
        lhs, rhs, average = lhs + reduced, rhs + reduced @ weight.T, average + weight / 2
    with open_checkpoint(out) as reader:
        merged = reader.get(HEAD).double()
    want = torch.linalg.solve(lhs, rhs).T
    torch.testing.assert_close(merged, want, rtol=1e-6, atol=2e-7)
    assert (want - average).abs().max() > 2e-6
