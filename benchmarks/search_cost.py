"""Cost of one forgetting-budget search trial (``asr-merge search``) against writing the
same merge and evaluating it with ``asr-merge merge`` + ``asr-merge eval``; search trials
per minute on the tiny NeMo and SpeechBrain models and on Whisper tiny.en.

What it measures
----------------
Built once in ``--workdir``: each toolkit's manifests of the synthetic corpus's
``dev-clean`` (the original domain) and of two target domains' ``dev`` sets
(``asr-merge prepare-librispeech``), and two perturbed copies of the toolkit's
generalist (every float tensor outside the feature extractor plus Gaussian noise of
``--noise`` of the tensor's standard deviation, seeded) as its experts. Every trial decodes
the first ``--utterances`` utterances of each of the three sets. Then, in one run, each variant
in a fresh child process (``benchmarks/measure.py``), CPU, ``--threads`` torch threads:

* ``search``: what :func:`merge_core.search.run_search` does: the study (SQLite in the
  work folder) with three fixed merges enqueued (AoDE, task arithmetic at lambda 0.4, TIES
  at density 0.2), then ``--drawn`` trials drawn by TPE; a trial is the merge computed in
  memory from the memory-mapped experts, ``load_state_dict`` into the model restored once,
  every dev set decoded (NeMo: on features computed once), scored, stored. The one-off
  set-up (opening, restoring, features, the generalist's dev WERs) happens before the timer
  and is reported apart;
* ``naive``: per fixed merge, ``asr-merge merge`` of that merge's recipe into a checkpoint
  (input hashing on, as by default) and ``asr-merge eval`` of it on the same three sets
  (transcript cache off): restore, ``transcribe``, score, report.

Both score the same three merges, so their dev WERs must agree set by set. Reported per
toolkit: the median trial of each variant over the fixed merges (and of ``search`` over
all its trials), the ratio naive / search of the median fixed-merge trial, search trials
per minute, the set-up time, and each process's peak RSS and peak private memory.

``--toolkits`` picks among (``nemo`` and ``speechbrain`` by default):

* ``nemo``, ``speechbrain``: the shipped tiny generalists (``models/``);
* ``whisper``: OpenAI Whisper tiny.en through SpeechBrain, as ``asr-merge demo --toolkit
  speechbrain --generalist whisper-tiny.en`` has it: the cached ``asr-merge get-model
  whisper-tiny.en`` written once as a Checkpointer folder
  (``<workdir>/whisper/generalist/CKPT+whisper-tiny.en``), the SpeechBrain CSVs, decoded by
  ``WhisperASR`` greedy search (``configs/speechbrain/whisper_inference.yaml``) over 30 s of
  padded audio per utterance. Its experts are perturbed over the whole model (the mel
  filters excepted), encoder included: at the default noise they still transcribe (on the
  first 4 utterances of dev-clean, 24 % and 21 % WER, the generalist 21 %), and every merge
  has its own encoder, so neither variant can reuse encoder outputs (no
  ``encoder_states_dir``). Not in the default list: every trial runs the encoder over 30 s
  of audio per utterance, tens of seconds per trial on 2 cores.

The corpus (``--corpus``, default ``/work/data/corpus`` or ``data/corpus``) is built at the
default size when it has no ``LibriSpeech/dev-clean``.

Usage: ``python -m benchmarks.search_cost [--toolkits nemo speechbrain whisper] [--corpus DIR]
[--utterances 20] [--drawn 6] [--threads 2] [--workdir DIR] [--quiet-wait 5] [--retries 0]``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import measure
from benchmarks.tables import Column, render_table

MODULE = __spec__.name  # every variant's child: python -m MODULE --run SPEC
REPO = Path(__file__).resolve().parents[1]
SHIPPED = {"nemo": REPO / "models" / "nemo_generalist.nemo",
           "speechbrain": REPO / "models" / "speechbrain_generalist" / "CKPT+generalist"}
TOOLKITS = {"nemo": "nemo", "speechbrain": "speechbrain", "whisper": "speechbrain"}  # choice -> its toolkit
EXPERT_NAMES = {"nemo": "expert{i}.nemo", "speechbrain": "CKPT+expert{i}", "whisper": "CKPT+expert{i}"}
FEATURE_EXTRACTORS = ("preprocessor.", "normalizer.", "whisper._mel_filters")  # tensors the experts keep
TARGET_DOMAINS = ("accented", "noisy")
# the fixed merges both variants score, as the search's `baselines` (its first trials)
FIXED = {"AoDE": {"method": "average"}, "task arithmetic": {"method": "task_arithmetic", "lambda": 0.4},
         "TIES": {"method": "ties", "density": 0.2, "lambda": 1.0}}
DEFAULT_CORPUS = next((p for p in (Path("/work/data/corpus"), REPO / "data" / "corpus") if p.is_dir()), REPO / "data" / "corpus")


# ------------------------------------------------------------------------ inputs


def perturbed_copy(source: Path, dest: Path, seed: int, noise: float) -> Path:
    """``source`` with seeded Gaussian noise on every float tensor outside the feature extractor
    (:data:`FEATURE_EXTRACTORS`)."""
    import torch

    from merge_core.checkpoint import open_checkpoint
    from merge_core.engine import write_stream

    generator = torch.Generator().manual_seed(seed)
    with open_checkpoint(source) as reader:

        def stream(order: list[str]):
            for name in order:
                t = reader.get(name)
                if t.is_floating_point() and t.numel() > 1 and not name.startswith(FEATURE_EXTRACTORS):
                    t = (t.float() + noise * t.float().std() * torch.randn(t.shape, generator=generator)).to(t.dtype)
                yield name, t

        write_stream(dest, {"method": "perturb", "parameters": {"seed": seed}}, [("base", reader, None)], reader, {}, stream,
                     hash_inputs=False)
    return dest


def generalist(workdir: Path, choice: str) -> Path:
    """The choice's generalist: the shipped one, or Whisper tiny.en written in ``workdir`` once."""
    if choice != "whisper":
        return SHIPPED[choice]
    from speechbrain_merge.whisper_demo import prepare_generalist

    return prepare_generalist(workdir / choice)


def ensure_inputs(workdir: Path, corpus: Path, choice: str, noise: float) -> dict[str, Any]:
    """The choice's generalist, its toolkit's dev manifests and its two experts, built once."""
    from merge_core.app.corpus import prepare_librispeech

    if not (corpus / "LibriSpeech" / "dev-clean").is_dir():
        from merge_core.app.corpus import prepare_synthetic_corpus

        prepare_synthetic_corpus(corpus, size="default")  # ~1 min on 2 cores
    toolkit = TOOLKITS[choice]
    suffix = ".json" if toolkit == "nemo" else ".csv"
    folder = workdir / "manifests" / toolkit
    original = folder / "LibriSpeech" / f"dev{'_' if toolkit == 'nemo' else '-'}clean{suffix}"
    if not original.is_file():
        prepare_librispeech(corpus / "LibriSpeech", original.parent, splits=["dev-clean"], toolkit=toolkit)
    sets = {}
    for domain in TARGET_DOMAINS:
        sets[domain] = folder / domain / f"dev{suffix}"
        if not sets[domain].is_file():
            prepare_librispeech(corpus / domain, sets[domain].parent, splits=["dev"], toolkit=toolkit)
    base = generalist(workdir, choice)
    experts = []
    for i in range(2):
        path = workdir / choice / EXPERT_NAMES[choice].format(i=i)
        path.parent.mkdir(parents=True, exist_ok=True)
        experts.append(path if path.exists() else perturbed_copy(base, path, seed=i, noise=noise))
    return {"generalist": str(base), "sets": {k: str(v) for k, v in sets.items()}, "original": str(original),
            "experts": [str(e) for e in experts]}


def toolkit_options(choice: str, corpus: Path) -> dict[str, Any]:
    """What decoding a checkpoint of the choice needs besides its manifest (SpeechBrain:
    the inference hparams with the generalist's architecture and tokenizer, ``$data_root``;
    Whisper: as the Whisper demo decodes, without encoder states)."""
    if choice == "nemo":
        return {}
    if choice == "whisper":
        from speechbrain_merge.whisper_demo import decoding_options

        return decoding_options(corpus)
    from speechbrain_merge.demo import INFERENCE_HPARAMS, generalist_hparams, tokenizer_file

    shipped = SHIPPED["speechbrain"]
    return {"hparams": str(INFERENCE_HPARAMS), "data_root": str(corpus),
            "hparams_overrides": {**generalist_hparams(shipped), "tokenizer_file": str(tokenizer_file(shipped))}}


def search_recipe(spec: dict[str, Any]) -> dict[str, Any]:
    workdir = Path(spec["workdir"]) / spec["toolkit"]
    return {
        "method": "search",
        "base_model": spec["inputs"]["generalist"],
        "models": [{"model": e, "name": f"e{i}"} for i, e in enumerate(spec["inputs"]["experts"])],
        "dev": {"sets": spec["inputs"]["sets"], "original": {"dev_clean": spec["inputs"]["original"]},
                "max_utterances": spec["utterances"], "batch_size": 16, "device": "cpu",
                "log": str(workdir / "search.trials.json"), **spec["options"]},
        "max_forgetting_pct": 1.0,
        "trials": len(FIXED) + spec["drawn"],
        "baselines": FIXED,
        "study": {"storage": str(workdir / f"search-{time.time_ns()}.db")},
        "output": str(workdir / EXPERT_NAMES[spec["toolkit"]].format(i="-search")),
        "hash_inputs": False,
    }


# ------------------------------------------------------------------------ children


def child_search(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from merge_core.recipes import parse_recipe
    from merge_core.search import (DevScorer, TrialRunner, enqueue_baselines, import_optuna, measure_reference, open_study,
                                   opened, quiet_optuna, scores, trial_method)

    torch.set_num_threads(spec["threads"])
    search = parse_recipe(search_recipe(spec))
    optuna = import_optuna()
    quiet_optuna(optuna)
    start = time.perf_counter()
    with opened(search) as (inputs, actions, ungrouped):
        study = open_study(optuna, search)
        scorer = DevScorer(inputs.template, search.dev)
        reference = measure_reference(search, scorer, inputs, actions)
        enqueue_baselines(search, study, ungrouped)
        runner = TrialRunner(search, inputs, actions, scorer, reference, ungrouped)
        setup_s = time.perf_counter() - start

        def trials() -> dict[str, Any]:
            ends = [time.perf_counter()]
            study.optimize(runner, n_trials=search.trials, callbacks=[lambda s, t: ends.append(time.perf_counter())])
            done = sorted(study.trials, key=lambda t: t.number)
            wers = [{n: c["wer"] for n, c in scores(t)["dev"].items()} for t in done[: len(FIXED)]]
            return {"trial_s": [b - a for a, b in zip(ends, ends[1:])], "wers": wers, "setup_s": setup_s,
                    "methods": [trial_method(t, search) for t in done]}

        return measure.timed(trials)


def child_naive(spec: dict[str, Any]) -> dict[str, Any]:
    import json

    import torch
    import yaml

    from merge_core.app.cli import main as asr_merge
    from merge_core.recipes import parse_recipe
    from merge_core.recipes.search import trial_recipe

    torch.set_num_threads(spec["threads"])
    search = parse_recipe(search_recipe(spec))
    workdir = Path(spec["workdir"]) / spec["toolkit"]
    manifests = {**spec["inputs"]["sets"], "dev_clean": spec["inputs"]["original"]}

    def trial(i: int, baseline: Any) -> dict[str, float]:
        recipe = trial_recipe(search, baseline.params(search.space, search.experts, ungrouped=True)).to_dict()
        output = workdir / EXPERT_NAMES[spec["toolkit"]].format(i=f"-naive{i}")
        recipe.update(output=str(output), allow_nonfinite=False, hash_inputs=True)
        (workdir / f"naive{i}.yaml").write_text(yaml.safe_dump(recipe))
        evaluation = {"toolkit": TOOLKITS[spec["toolkit"]], "models": [{"name": "merged", "model": str(output)}],
                      "manifests": manifests, "forgetting_sets": ["dev_clean"], "max_utterances": spec["utterances"],
                      "batch_size": 16, "device": "cpu", "cache": False, "output_dir": str(workdir / f"eval{i}"),
                      **spec["options"]}
        (workdir / f"eval{i}.yaml").write_text(yaml.safe_dump(evaluation))
        assert asr_merge(["merge", str(workdir / f"naive{i}.yaml"), "-q"]) == 0
        assert asr_merge(["eval", str(workdir / f"eval{i}.yaml"), "-q"]) == 0
        report = json.loads((workdir / f"eval{i}" / "report.json").read_text())
        return report["models"][0]["wer"]

    def trials() -> dict[str, Any]:
        seconds, wers = [], []
        for i, baseline in enumerate(search.baselines):
            start = time.perf_counter()
            wers.append(trial(i, baseline))
            seconds.append(time.perf_counter() - start)
        return {"trial_s": seconds, "wers": wers}

    return measure.timed(trials)


CHILDREN: dict[str, measure.ChildFn] = {"search": child_search, "naive": child_naive}


# ------------------------------------------------------------------------ report


COLUMNS = [
    Column("toolkit", 11, "<"), Column("variant", 7, "<"), Column("trials", 6), Column("fixed-merge trial s", 19),
    Column("all trials s", 12), Column("trials/min", 10), Column("set-up s", 8), Column("peak RSS GiB", 12),
    Column("peak priv GiB", 13), Column("other cpu", 9),
]


def cells(toolkit: str, r: measure.Result) -> list[str]:
    seconds = r.extra["trial_s"]
    fixed = statistics.median(seconds[: len(FIXED)])
    everything = statistics.median(seconds)
    per_min = 60 * len(seconds) / sum(seconds)
    setup = r.extra.get("setup_s")
    return [toolkit, r.variant, str(len(seconds)), f"{fixed:.2f}", f"{everything:.2f}", f"{per_min:.1f}",
            "-" if setup is None else f"{setup:.1f}", f"{measure.gib(r.peak_rss_kib):.2f}",
            f"{measure.gib(r.peak_anon_kib):.2f}", f"{r.other_cores:.2f}"]


def same_wers(a: list[dict[str, float]], b: list[dict[str, float]]) -> bool:
    return all(abs(x[k] - y[k]) < 1e-9 for x, y in zip(a, b) for k in x)


def main() -> None:
    parser = measure.bench_parser(MODULE, __doc__)
    parser.add_argument("--toolkits", nargs="+", default=["nemo", "speechbrain"], choices=list(TOOLKITS))
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="synthetic corpus (built there when missing)")
    parser.add_argument("--utterances", type=int, default=20, help="utterances each trial decodes from each of the 3 dev sets")
    parser.add_argument("--drawn", type=int, default=6, help="search trials drawn by TPE after the 3 fixed merges")
    parser.add_argument("--noise", type=float, default=0.02, help="the experts' perturbation, of each tensor's std")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every variant")
    measure.add_workdir_option(parser, default=None, about="inputs and outputs go here (default: a new temporary folder)")
    measure.add_quiet_options(parser, wait_s=5.0, retries=0)
    args = parser.parse_args()
    if measure.ran_as_child(args, CHILDREN):
        return
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="search-cost-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus.resolve()
    quiet, log = measure.Quiet(args.quiet_wait, args.retries), workdir / "children.log"
    rows, ratios = [], []
    for toolkit in args.toolkits:
        spec = {"toolkit": toolkit, "inputs": ensure_inputs(workdir, corpus, toolkit, args.noise),
                "options": toolkit_options(toolkit, corpus), "utterances": args.utterances, "drawn": args.drawn,
                "threads": args.threads, "workdir": str(workdir)}
        search, naive = (measure.run_quietly(MODULE, kind, {**spec, "kind": kind}, quiet, log=log)
                         for kind in ("search", "naive"))
        rows += [cells(toolkit, search), cells(toolkit, naive)]
        ratio = statistics.median(naive.extra["trial_s"]) / statistics.median(search.extra["trial_s"][: len(FIXED)])
        ratios.append(f"{toolkit}: naive / search, median fixed-merge trial: {ratio:.1f}x; "
                      f"peak RSS naive / search: {naive.peak_rss_kib / search.peak_rss_kib:.2f}; "
                      f"dev WERs identical: {same_wers(search.extra['wers'], naive.extra['wers'])}")
    print(f"{measure.machine_summary()}; {args.threads} torch thread(s); per trial the first {args.utterances} "
          f"utterances of dev-clean, {' and '.join(TARGET_DOMAINS)} dev; each toolkit's generalist + 2 "
          f"perturbed copies; {len(FIXED)} fixed merges + {args.drawn} drawn trials")
    print("\n".join(render_table(COLUMNS, rows)))
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
