"""MAM and L-MAM (Sundar et al.) on the synthetic corpus: a tiny HuBERT CTC model, a tiny BERT.

    asr-merge make-corpus data/corpus --size default
    python recipes/mam_experiment/run.py data/corpus results/mam

Sundar et al. merge the attention of a text model (BERT-large) into a speech model
(HuBERT-large fine-tuned with CTC). Neither downloads here, so both are built from
configs at one width and depth and trained on the corpus:

1. the target M_t: a tiny HuBERT (``transformers.HubertModel`` from a config), CTC-trained
   from scratch on ``train-clean-100`` through SpeechBrain's Hugging Face wrapper
   (``speechbrain_merge.recipes.train_hubert_ctc``, ``configs/speechbrain/tiny_hubert_ctc.yaml``);
2. the source M_s: a tiny BERT (``transformers.BertForMaskedLM``), masked-LM-trained on the
   same transcripts in M_t's SentencePiece tokens;
3. MAM without data (Eq. 1, 2): ``method: mam`` recipes (``name_map: bert_to_hubert``) on
   M_t's ``CKPT+`` folder over a lambda sweep on every layer, on the top-k layers by
   Sliced Wasserstein Distance of mean-pooled states of paired dev-clean audio and text,
   and Table 1's noise baselines; WER on test-clean and test-other;
4. with data (Table 5): fine-tuning on one target domain from M_t, from the best MAM
   model, and with L-MAM (the ``lmam`` hparams key, lambda learned per layer), each
   scored on the domain's test set and on LibriSpeech.

Writes ``results.json`` and ``results.md`` in the output folder; reruns reuse the
trained models found there.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from hyperpyyaml import load_hyperpyyaml
from safetensors.torch import save_file

from merge_core.atomic import write_text_atomically
from merge_core.app.corpus import prepare_librispeech
from merge_core.recipes.mam import MamRecipe, run_mam
from merge_core.attention.similarity import mean_pooled_hidden_states, rank_layers
from speechbrain_merge.recipes.train_ctc import csv_dataset, fit
from speechbrain_merge.recipes.train_hubert_ctc import HubertCTCBrain

REPO = Path(__file__).resolve().parents[2]
HPARAMS = REPO / "configs" / "speechbrain" / "tiny_hubert_ctc.yaml"
HIDDEN, LAYERS, HEADS, FFN = 96, 4, 4, 384
TEST_SETS = ("test-clean", "test-other")
RUN_OPTS = {"device": "cpu", "noprogressbar": True}


def write_hubert(folder: Path, seed: int) -> Path:
    """A randomly initialised HuBERT of the experiment's size, as a Hugging Face folder:
    a 5-layer convolutional front end of stride 320 (20 ms frames, as HuBERT's) and a
    Transformer of ``LAYERS`` x ``HIDDEN``."""
    torch.manual_seed(seed)
    config = transformers.HubertConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
        conv_dim=(32, 64, 64, 64, 64), conv_kernel=(10, 3, 3, 3, 2), conv_stride=(5, 4, 4, 2, 2),
        num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
        do_stable_layer_norm=True, mask_time_prob=0.05, layerdrop=0.0,
    )
    transformers.HubertModel(config).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=True
    ).save_pretrained(folder)
    return folder


def hparams_for(args: argparse.Namespace, output: Path, **overrides: Any) -> dict[str, Any]:
    given = {
        "output_folder": str(output),
        "hubert_source": str(args.out / "hubert_init"),
        "hubert_hidden": HIDDEN,
        "vocab_size": args.vocab_size,
        "data_root": str(args.corpus),
        "train_csv": str(args.csvs["LibriSpeech"]["train-clean-100"]),
        "valid_csv": str(args.csvs["LibriSpeech"]["dev-clean"]),
        "tokenizer_folder": str(args.out / "generalist" / "tokenizer"),
        "seed": args.seed,
        **overrides,
    }
    with open(HPARAMS, encoding="utf-8") as f:
        return load_hyperpyyaml(f, given)


def train_target(args: argparse.Namespace) -> Path:
    """M_t: the HuBERT CTC generalist's ``model.ckpt`` (its best checkpoint by dev WER)."""
    from speechbrain.utils.checkpoints import Checkpointer

    hparams = hparams_for(args, args.out / "generalist", number_of_epochs=args.epochs, lr=args.lr, avg_checkpoints=1)
    fit(hparams, RUN_OPTS, HubertCTCBrain)
    return Checkpointer(hparams["save_folder"]).find_checkpoint(min_key="WER").path


def transcripts(csv_path: Path) -> list[str]:
    import csv

    with open(csv_path, newline="", encoding="utf-8") as f:
        return [row["wrd"] for row in csv.DictReader(f)]


def train_source(args: argparse.Namespace, tokenizer: Any) -> Path:
    """M_s: a BERT of M_t's width and depth, masked-LM-trained on the training transcripts
    tokenized with M_t's SentencePiece model (ids shifted past [PAD], [CLS], [SEP], [MASK])."""
    path = args.out / "bert" / "model.safetensors"
    if path.exists():
        return path
    torch.manual_seed(args.seed)
    pad, cls, sep, mask, shift = 0, 1, 2, 3, 4
    config = transformers.BertConfig(
        vocab_size=args.vocab_size + shift, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=256, pad_token_id=pad,
    )
    model = transformers.BertForMaskedLM(config)
    sentences = [[cls, *(i + shift for i in tokenizer.encode_as_ids(t))][:255] + [sep]
                 for t in transcripts(args.csvs["LibriSpeech"]["train-clean-100"])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = random.Random(args.seed)
    model.train()
    for step in range(args.bert_steps):
        batch = rng.sample(sentences, min(32, len(sentences)))
        ids = torch.full((len(batch), max(map(len, batch))), pad)
        for row, sentence in enumerate(batch):
            ids[row, : len(sentence)] = torch.tensor(sentence)
        chosen = (torch.rand(ids.shape) < 0.15) & (ids >= shift)
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        inputs = torch.where(chosen, torch.full_like(ids, mask), ids)
        loss = model(input_ids=inputs, attention_mask=(ids != pad).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == args.bert_steps - 1:
            print(f"BERT step {step}: masked-LM loss {loss.item():.3f}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the MLM head ties its decoder to the word embeddings: safetensors wants distinct tensors
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)
    return path


def evaluate(args: argparse.Namespace, model_ckpt: Path, csv_path: Path, tag: str) -> float:
    """WER (%) of the weights in ``model_ckpt`` on ``csv_path``: a HuBERT CTC Brain's own
    ``evaluate`` loop, greedy CTC decoding."""
    hparams = hparams_for(args, args.out / "eval" / tag)
    hparams["model"].load_state_dict(torch.load(model_ckpt, map_location="cpu", weights_only=True))
    brain = HubertCTCBrain(modules=hparams["modules"], hparams=hparams, run_opts=RUN_OPTS)
    brain.tokenizer = hparams["tokenizer"].sp
    data = csv_dataset(str(csv_path), hparams, brain.tokenizer).filtered_sorted(sort_key="duration")
    brain.evaluate(data, test_loader_kwargs={"batch_size": 8})
    return float(brain.test_stats["WER"])


def score(args: argparse.Namespace, model_ckpt: Path, tag: str, sets: dict[str, Path]) -> dict[str, float]:
    return {name: round(evaluate(args, model_ckpt, csv_path, f"{tag}-{name}"), 2) for name, csv_path in sets.items()}


def mam(args: argparse.Namespace, target: Path, source: Path, name: str, layers: list[int] | None, **parameters: Any) -> Path:
    """A ``method: mam`` recipe run on the target ``CKPT+`` folder; the merged folder."""
    output = args.out / "mam" / f"CKPT+{name}"
    if not output.exists():
        run_mam(MamRecipe.from_mapping({
            "method": "mam", "target_model": str(target), "source_model": str(source), "name_map": "bert_to_hubert",
            "layers": layers, "parameters": parameters, "output": str(output), "hash_inputs": False,
        }))
    return output


def layer_ranking(args: argparse.Namespace, target: Path, source: Path, tokenizer: Any) -> list[int]:
    """Layers by SWD between mean-pooled HuBERT states of dev-clean audio and BERT states
    of their transcripts (Sundar et al., Table 3), most similar first."""
    hparams = hparams_for(args, args.out / "eval" / "similarity")
    hparams["model"].load_state_dict(torch.load(target / "model.ckpt", map_location="cpu", weights_only=True))
    hubert = hparams["hubert"].model.eval()
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=args.vocab_size + 4, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=256,
    ))
    from safetensors.torch import load_file

    bert.load_state_dict({k.removeprefix("bert."): v for k, v in load_file(source).items() if k.startswith("bert.")}, strict=False)
    bert.eval()
    data = csv_dataset(str(args.csvs["LibriSpeech"]["dev-clean"]), hparams, tokenizer)
    pairs = [(data[i]["sig"], data[i]["wrd"]) for i in range(len(data))]

    def audio_states(pair: tuple[torch.Tensor, str]) -> tuple[torch.Tensor, ...]:
        wav = (pair[0] - pair[0].mean()) / (pair[0].std() + 1e-7)
        return hubert(wav[None], output_hidden_states=True).hidden_states[1:]

    def text_states(pair: tuple[torch.Tensor, str]) -> tuple[torch.Tensor, ...]:
        ids = torch.tensor([[1, *(i + 4 for i in tokenizer.encode_as_ids(pair[1])), 2]])
        return bert(input_ids=ids, output_hidden_states=True).hidden_states[1:]

    return rank_layers(mean_pooled_hidden_states(audio_states, pairs), mean_pooled_hidden_states(text_states, pairs))


def finetune(args: argparse.Namespace, start: Path, name: str, **keys: Any) -> Path:
    """Fine-tune the weights of ``start`` on the target domain; the exported expert's model.ckpt."""
    expert = args.out / "finetune" / name / "expert"
    found = sorted(expert.glob("CKPT+*/model.ckpt"))
    if found:
        return found[-1]
    domain = args.csvs[args.domain]
    hparams = hparams_for(
        args, args.out / "finetune" / name, train_csv=str(domain["train"]), valid_csv=str(domain["dev"]),
        number_of_epochs=args.finetune_epochs, lr=args.finetune_lr, freeze_feature_extractor=True,
    )
    hparams["model"].load_state_dict(torch.load(start / "model.ckpt", map_location="cpu", weights_only=True))
    hparams.update(export_path=str(expert), export_recoverables=["model"], **keys)
    brain = fit(hparams, RUN_OPTS, HubertCTCBrain)
    lambdas = brain.lmam_lambdas()
    if lambdas:
        (args.out / "finetune" / name / "lambdas.json").write_text(json.dumps(lambdas, indent=2) + "\n")
    return sorted(expert.glob("CKPT+*/model.ckpt"))[-1]


def markdown(results: dict[str, Any]) -> str:
    sets = [*TEST_SETS]
    lines = ["| model | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
    for row in results["zero_shot"]:
        lines.append(f"| {row['model']} | " + " | ".join(f"{row['wer'][s]:.2f}" for s in sets) + " |")
    domain = results["domain"]
    lines += ["", f"| fine-tuned on {domain} | {domain} test | " + " | ".join(sets) + " |", "|---|---:|" + "---:|" * len(sets)]
    for row in results["finetuned"]:
        lines.append(f"| {row['model']} | {row['wer']['domain']:.2f} | " + " | ".join(f"{row['wer'][s]:.2f}" for s in sets) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", type=Path, help="the synthetic corpus folder (asr-merge make-corpus)")
    p.add_argument("out", type=Path, help="the experiment folder (reused by reruns)")
    p.add_argument("--epochs", type=int, default=20, help="M_t's CTC training epochs")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bert-steps", type=int, default=3000)
    p.add_argument("--domain", default="accented", help="the fine-tuning domain")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.5])
    p.add_argument("--vocab-size", type=int, default=128, help="M_t's SentencePiece unigram pieces")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.corpus, args.out = args.corpus.resolve(), args.out.resolve()
    started = time.monotonic()
    args.csvs = {
        domain: {split: paths["speechbrain"] for split, paths in prepare_librispeech(
            args.corpus / domain, args.out / "manifests" / domain, toolkit="speechbrain").items()}
        for domain in ("LibriSpeech", args.domain)
    }
    if not (args.out / "hubert_init").exists():
        write_hubert(args.out / "hubert_init", args.seed)
    target = train_target(args)
    tokenizer = hparams_for(args, args.out / "eval" / "tokenizer")["tokenizer"].sp
    source = train_source(args, tokenizer)
    librispeech = {s: args.csvs["LibriSpeech"][s] for s in TEST_SETS}

    ranking = layer_ranking(args, target, source, tokenizer)
    print(f"layers by SWD, most similar first: {ranking}", flush=True)
    candidates: list[tuple[str, Path]] = [("M_t (no merge)", target)]
    for lam in args.lambdas:
        candidates.append((f"MAM all layers, lambda {lam}", mam(args, target, source, f"all-{lam}", None, **{"lambda": lam})))
    for k in (1, 2):
        layers = sorted(ranking[:k])
        candidates.append((f"MAM top-{k} SWD layers {layers}, lambda 0.1", mam(args, target, source, f"top{k}-0.1", layers, **{"lambda": 0.1})))
    for baseline in ("noise_source", "noise_target"):
        candidates.append((f"{baseline} all layers, lambda 0.1", mam(args, target, source, f"{baseline}-0.1", None, **{"lambda": 0.1, "baseline": baseline})))
    zero_shot = []
    for name, folder in candidates:
        zero_shot.append({"model": name, "wer": score(args, folder / "model.ckpt", folder.name, librispeech)})
        print(zero_shot[-1], flush=True)

    best_name, best_folder = min(
        (c for c in candidates[1:] if "noise" not in c[0]), key=lambda c: sum(next(r for r in zero_shot if r["model"] == c[0])["wer"].values())
    )
    domain_sets = {"domain": args.csvs[args.domain]["test"], **librispeech}
    lmam = {"source_model": str(source), "name_map": "bert_to_hubert", "init_lambda": 0.05}
    runs = [
        ("FT", target, {}),
        (f"MAM ({best_name}) + FT", best_folder, {}),
        ("L-MAM (init lambda 0.05) + FT", target, {"lmam": lmam}),
    ]
    finetuned = []
    for i, (name, start, keys) in enumerate(runs):
        expert = finetune(args, start, f"run{i}", **keys)
        finetuned.append({"model": name, "wer": score(args, expert, f"ft{i}", domain_sets)})
        print(finetuned[-1], flush=True)
    lambdas_file = args.out / "finetune" / "run2" / "lambdas.json"
    results = {
        "domain": args.domain,
        "swd_ranking": ranking,
        "zero_shot": zero_shot,
        "finetuned": finetuned,
        "lmam_lambdas": json.loads(lambdas_file.read_text()) if lambdas_file.exists() else None,
        "wall_s": round(time.monotonic() - started, 1),
        "command": " ".join(["python", "recipes/mam_experiment/run.py", *(argv or sys.argv[1:])]),
    }
    write_text_atomically(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomically(args.out / "results.md", markdown(results))
    print(markdown(results))
    shutil.rmtree(args.out / "eval", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
