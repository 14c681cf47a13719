"""RegMean on real ``.nemo`` experts: Gram files by ``asr-merge grams`` through NeMo's own
``transcribe`` on espeak-ng speech, checked against a hand recomputation, then merged by
``asr-merge merge`` into a ``.nemo`` that restores and transcribes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import soundfile
import torch
import yaml
from safetensors.torch import load_file

from merge_core.app.cli import main
from merge_core.evaluation.manifests import read_nemo_manifest
from merge_core.checkpoint import open_checkpoint
from merge_core.grams import GramCollector, gram_path, linear_layers, read_record

pytest.importorskip("nemo.collections.asr")
from nemo_merge.testing import import_nemo_quietly  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "nemo" / "grams.yaml"
BATCH = 3  # 8 utterances: batches of 3, 3 and 2, padded to their longest
DECODER = "decoder.decoder_layers.0.weight"  # a kernel-1 Conv1d: the CTC head


def restored(path: Path):
    from nemo.collections.asr.models import ASRModel

    import_nemo_quietly()
    return ASRModel.restore_from(str(path), map_location="cpu").eval()


def collect(model: Path, manifest: Path, *overrides: str) -> None:
    """``asr-merge grams`` with the shipped config, for the test's model and manifest."""
    assert (
        main(
            [
                "grams",
                str(CONFIG),
                f"model={model}",
                f"manifest={manifest}",
                f"batch_size={BATCH}",
                "batches=null",
                "device=cpu",
                *overrides,
                "-q",
            ]
        )
        == 0
    )


@pytest.fixture(scope="module")
def experts(tmp_path_factory, tiny_nemo_experts, nemo_audio_manifest) -> list[Path]:
    """Copies of the two experts, each with its Gram file collected by ``asr-merge grams``."""
    folder = tmp_path_factory.mktemp("regmean_nemo")
    copies = [Path(shutil.copyfile(expert, folder / expert.name)) for expert in tiny_nemo_experts]
    for copy in copies:
        collect(copy, nemo_audio_manifest)
    return copies


def test_grams_equal_a_hand_recomputation_and_one_utterance_a_batch(experts, nemo_audio_manifest):
    """Each utterance run alone (nothing padded) through preprocessor, encoder and decoder:
    the decoder's Gram summed by hand from the encoder's output (no hook), and every
    layer's Gram collected with batches of one; the batched, masked file must agree."""
    model = restored(experts[0])
    model.preprocessor.featurizer.dither = 0.0  # as transcribe sets them
    model.preprocessor.featurizer.pad_to = 0
    total, lengths = torch.zeros(96, 96, dtype=torch.float64), []
    with GramCollector(linear_layers(model)) as single, torch.inference_mode():
        for u in read_nemo_manifest(nemo_audio_manifest):
            single.start_batch(1)
            audio, _ = soundfile.read(u.audio, dtype="float32")
            features, feature_length = model.preprocessor(
                input_signal=torch.from_numpy(audio)[None], length=torch.tensor([len(audio)])
            )
            encoded, encoded_length = model.encoder(audio_signal=features, length=feature_length)
            model.decoder(encoder_output=encoded)
            frames = encoded[0].double()
            total += frames @ frames.T
            lengths.append(int(encoded_length))
    alone = single.finish().matrices
    got = load_file(gram_path(experts[0]))
    record = read_record(gram_path(experts[0]))
    assert record["batches"] == 3 and record["utterances"] == 8 and record["skipped"] == {} and record["not_run"] == []
    assert record["rows"][DECODER] == sum(lengths) == total.new_tensor(lengths).sum()
    torch.testing.assert_close(got[DECODER].double(), total / sum(lengths), rtol=2e-4, atol=2e-5)
    # the subsampling's projection runs before the encoder states its lengths: held, then masked
    assert record["rows"]["encoder.pre_encode.out.weight"] == sum(lengths)
    layers = [n for n in got if "linear_pos" not in n]  # relative positions span the batch's longest: by design
    assert len(layers) == 3 * 10 + 2
    for name in layers:
        torch.testing.assert_close(got[name], alone[name], rtol=1e-3, atol=1e-4, msg=name)


def test_regmean_merge_of_two_experts_restores_and_transcribes(experts, nemo_audio_manifest, tmp_path):
    out = tmp_path / "regmean.nemo"
    recipe = tmp_path / "regmean.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"method": "regmean", "models": [str(e) for e in experts], "parameters": {"alpha": 0.5}, "output": str(out)}
        )
    )
    assert main(["merge", str(recipe), "-q"]) == 0
    model = restored(out)
    audio = [str(u.audio) for u in read_nemo_manifest(nemo_audio_manifest)]
    assert len(model.transcribe(audio, batch_size=4, num_workers=0, verbose=False)) == len(audio)
    # the CTC head is the closed form of the two experts' Gram files
    merged = model.state_dict()[DECODER][:, :, 0].double()
    lhs, rhs, average = 0, 0, 0
    for expert in experts:
        gram = load_file(gram_path(expert))[DECODER].double()
        reduced = 0.5 * gram + 0.5 * torch.diag(gram.diagonal())
        with open_checkpoint(expert) as reader:
            weight = reader.get(DECODER)[:, :, 0].double()
        lhs, rhs, average = lhs + reduced, rhs + reduced @ weight.T, average + weight / 2
    torch.testing.assert_close(merged, torch.linalg.solve(lhs, rhs).T, rtol=1e-4, atol=1e-5)
    assert (merged - average).abs().max() > 1e-3
