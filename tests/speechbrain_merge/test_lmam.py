"""L-MAM in a SpeechBrain fine-tuning: the ``lmam`` hparams key of ``MergeableBrain``
merges a tiny BERT's attention into a tiny HuBERT loaded through SpeechBrain's Hugging
Face wrapper, in a real ``Brain.fit`` of the HuBERT CTC recipe, exported folded."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("speechbrain")
transformers = pytest.importorskip("transformers")

from hyperpyyaml import load_hyperpyyaml  # noqa: E402
from speechbrain.dataio.batch import PaddedBatch  # noqa: E402

from merge_core.attention.lmam import lmam_lambdas  # noqa: E402
from speechbrain_merge.recipes.train_ctc import csv_dataset, fit  # noqa: E402
from speechbrain_merge.recipes.train_hubert_ctc import HubertCTCBrain  # noqa: E402
from tests.merge_core.test_mam import HIDDEN, tiny_bert, tiny_hubert  # noqa: E402
from tests.speechbrain_merge.conftest import checkpoints  # noqa: E402

HPARAMS = Path(__file__).resolve().parents[2] / "configs" / "speechbrain" / "tiny_hubert_ctc.yaml"
INIT = 0.3
Q = "0.model.encoder.layers.{}.attention.q_proj.weight"  # model = ModuleList[hubert wrapper, ctc_lin]


def write_hubert_folder(folder: Path) -> Path:
    """A Hugging Face HuBERT folder as ``from_pretrained`` reads it, offline."""
    tiny_hubert(ctc=False).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, return_attention_mask=True).save_pretrained(folder)
    return folder


def load_hparams(output: Path, hubert: Path, sb_data, **overrides) -> dict:
    given = {
        "output_folder": str(output),
        "hubert_source": str(hubert),
        "hubert_hidden": HIDDEN,
        "vocab_size": 40,
        "data_root": str(sb_data.data_root),
        "train_csv": str(sb_data.train_csv),
        "valid_csv": str(sb_data.test_clean_csv),
        "number_of_epochs": 1,
        "batch_size": 4,
        "lr": 0.05,
        **overrides,
    }
    with open(HPARAMS, encoding="utf-8") as f:
        return load_hyperpyyaml(f, given)


@pytest.fixture(scope="module")
def lmam_run(tmp_path_factory, sb_data):
    root = tmp_path_factory.mktemp("sb_lmam")
    hubert = write_hubert_folder(root / "hubert")
    bert_state = {k: v + 0.1 * torch.randn_like(v) if k.endswith(".bias") else v.contiguous() for k, v in tiny_bert().state_dict().items()}
    save_file(bert_state, root / "bert.safetensors")
    hparams = load_hparams(root / "run", hubert, sb_data)
    hparams.update(
        lmam={"source_model": str(root / "bert.safetensors"), "name_map": "bert_to_hubert", "init_lambda": INIT},
        export_path=str(root / "expert"),
        export_recoverables=["model"],
    )
    brain = fit(hparams, {"device": "cpu", "noprogressbar": True}, HubertCTCBrain)
    return SimpleNamespace(brain=brain, hparams=hparams, root=root, hubert=hubert, bert=bert_state)


def test_lmam_lambdas_train_inside_the_unit_interval(lmam_run):
    lambdas = lmam_run.brain.lmam_lambdas()
    assert len(lambdas) == 2 * 3 * 2  # layers x q/k/v x weight/bias
    assert all(name.startswith("hubert.model.encoder.layers.") for name in lambdas)
    assert all(0.0 < lam < 1.0 for lam in lambdas.values())
    assert any(abs(lam - INIT) > 1e-3 for lam in lambdas.values())


def test_exported_hubert_expert_is_plain_and_gives_the_parametrized_outputs(lmam_run, sb_data):
    (expert,) = checkpoints(Path(lmam_run.hparams["export_path"]))
    exported = torch.load(expert / "model.ckpt", weights_only=True)
    fresh = load_hparams(lmam_run.root / "fresh", lmam_run.hubert, sb_data)
    assert list(exported) == list(fresh["model"].state_dict())
    # Eq. 3 on the folded tensor, with W_t the still-trainable original
    interpolation = lmam_run.brain.modules.hubert.model.encoder.layers[1].attention.q_proj.parametrizations.weight
    lam = float(torch.sigmoid(interpolation[0].logit.detach()))
    expected = lam * lmam_run.bert["encoder.layer.1.attention.self.query.weight"] + (1 - lam) * interpolation.original.detach()
    assert torch.allclose(exported[Q.format(1)], expected, atol=1e-6)
    # the exported weights in an unmodified model decode like the parametrized one
    fresh["model"].load_state_dict(exported)
    batch = next(iter(torch.utils.data.DataLoader(
        csv_dataset(str(sb_data.test_other_csv), fresh, lmam_run.brain.tokenizer), batch_size=2,
        collate_fn=PaddedBatch,
    )))
    wavs, lens = batch.sig
    lmam_run.brain.modules.eval()
    fresh["model"].eval()
    with torch.no_grad():
        trained = lmam_run.brain.modules.ctc_lin(lmam_run.brain.modules.hubert(wavs, lens))
        plain = fresh["ctc_lin"](fresh["hubert"](wavs, lens))
    assert (trained - plain).abs().max() < 1e-5
    assert lmam_lambdas(lmam_run.brain.modules)  # exporting left the parametrization in place
