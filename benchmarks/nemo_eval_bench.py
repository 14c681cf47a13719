"""Throughput of ``asr-merge eval`` against a plain NeMo transcribe-and-score loop.

What it measures
----------------
Built once and cached in ``--workdir``, from the tests' pieces (:mod:`nemo_merge.testing`):
``--utterances`` short English utterances of the tests' sentence generator, spoken by
espeak-ng at the tests' speaking rate, voices alternating ``en-us``/``en-gb``, listed in
a NeMo manifest, and a *babbler*: the tests' tiny FastConformer-CTC-BPE, freshly
initialized, with the CTC blank's output bias pushed down so that its greedy
transcripts are non-empty word salad and the WER has real errors to count (as the
``babbler`` fixture of ``tests/nemo_merge/test_evaluate.py`` does). Then, in one run,
each in a fresh child process (``benchmarks/measure.py``):

* ``ours``: :func:`nemo_merge.evaluate.evaluate` (what ``asr-merge eval`` runs) on
  that manifest with ``cache: false``: manifest read and every audio file checked,
  weights hashed (cold digest cache), ``ASRModel.restore_from``, the model's batched
  ``transcribe``, jiwer scoring, ``report.json``/``.md``/``.png`` written;
* ``plain``: ``ASRModel.restore_from`` + ``model.transcribe(paths, batch_size=B)`` +
  ``nemo.collections.asr.metrics.wer.word_error_rate``, the loop one writes by hand.

Both on CPU with the same batch size and torch thread count (``--threads``, default 1:
on a shared machine, several threads wait on each other whenever another process takes
a core, and timings scatter), ``--repeats`` times each in alternating order
(ours first on even rounds, plain first on odd ones). The time is the work alone,
after the imports (both import NeMo's ASR collection first); utterances per second =
utterances / work time. The ratio ours/plain is taken on the best (shortest) run of
each, and shown for the median runs too. Both WERs must be equal (no normalisation:
``word_error_rate`` applies none). Last, ``ours`` runs with ``cache: true`` twice on a
fresh cache folder: once filling it, once rerunning from it (no model is loaded).

Usage: ``python -m benchmarks.nemo_eval_bench [--utterances 400] [--batch-size 16]
[--threads 1] [--repeats 3] [--workdir DIR] [--quiet-wait 5] [--retries 0]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import measure
from benchmarks.tables import Column, print_report, render_table, verdict
from nemo_merge.testing import import_nemo_quietly

MODULE = __spec__.name  # every variant's child: python -m MODULE --run SPEC
FORMAT_VERSION = 1  # bump when the built inputs change, to invalidate cached ones
VOICES = ("en-us", "en-gb")
SET = "bench"
RAW = {"lowercase": False, "strip_punctuation": False}  # word_error_rate normalises nothing
BLANK_BIAS = -30.0  # far below the other classes: greedy CTC never emits blank


# ------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Inputs:
    manifest: Path
    model: Path

    def all(self) -> list[Path]:
        return [self.manifest, self.model]


def inputs_in(workdir: Path, utterances: int) -> Inputs:
    folder = workdir / f"nemo-eval-v{FORMAT_VERSION}-{utterances}utt"
    return Inputs(folder / "manifest.json", folder / "babbler.nemo")


def write_speech(manifest: Path, count: int) -> None:
    """``count`` espeak-ng utterances in ``audio/`` and the NeMo manifest listing them."""
    from nemo_merge.testing import english_sentences, write_speech_manifest

    texts = english_sentences(count)[:count]
    write_speech_manifest(manifest, [(text, VOICES[i % len(VOICES)]) for i, text in enumerate(texts)])


def write_babbler(path: Path) -> None:
    """The tiny model, untrained, with the blank logit pushed down: it says something."""
    import torch

    from nemo_merge.models import build_model
    from nemo_merge.testing import TINY_CONFIG, ensure_tokenizer, save_nemo

    model = build_model(TINY_CONFIG, ensure_tokenizer(path.parent), seed=0)
    with torch.no_grad():
        bias = model.decoder.decoder_layers[0].bias
        bias[-1] = BLANK_BIAS
        bias[:-1] = torch.linspace(-1.0, 1.0, bias.numel() - 1)
    save_nemo(model, path)


def child_build(spec: dict[str, Any]) -> dict[str, Any]:
    import_nemo_quietly()
    inputs = Inputs(Path(spec["manifest"]), Path(spec["model"]))

    def build() -> None:
        if not inputs.manifest.is_file():
            write_speech(inputs.manifest, spec["utterances"])
        if not inputs.model.is_file():
            write_babbler(inputs.model)

    return measure.timed(build)


def ensure_inputs(workdir: Path, utterances: int, log: Path) -> Inputs:
    """Synthesize the speech and build the model in a child process unless cached already."""
    inputs = inputs_in(workdir, utterances)
    if all(p.is_file() for p in inputs.all()):
        return inputs
    inputs.manifest.parent.mkdir(parents=True, exist_ok=True)
    print(f"building {utterances} utterances and the model in {inputs.manifest.parent} ...", flush=True)
    spec = {"kind": "build", "manifest": str(inputs.manifest), "model": str(inputs.model), "utterances": utterances}
    built = measure.run_child(MODULE, "build", spec, log=log)
    print(f"  built in {built.wall_s:.1f} s", flush=True)
    return inputs


# ------------------------------------------------------------------ child variants


def eval_config(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "models": [{"name": "babbler", "model": spec["model"]}],
        "manifests": {SET: spec["manifest"]},
        "forgetting_sets": [SET],
        "normalization": RAW,
        "batch_size": spec["batch_size"],
        "device": "cpu",
        "output_dir": spec["output_dir"],
        "cache": spec["cache"],
        "cache_dir": spec.get("cache_dir"),
    }


def prepare_child(spec: dict[str, Any]) -> None:
    """What both variants do before the timer starts: import NeMo's ASR collection (so
    neither pays for it in the timed part) and set torch's thread count."""
    import torch

    import_nemo_quietly()
    torch.set_num_threads(spec["threads"])


def time_report_writing(extra: dict[str, float]) -> None:
    """Add the seconds ``run_evaluation`` spends writing report.json/.md/.png to
    ``extra["report_s"]``: a fixed cost per invocation, however many utterances."""
    from merge_core.evaluation import runner

    write_report = runner.write_report

    def timed_write_report(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return write_report(*args, **kwargs)
        finally:
            extra["report_s"] = extra.get("report_s", 0.0) + time.perf_counter() - start

    runner.write_report = timed_write_report  # the name run_evaluation calls


def child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    prepare_child(spec)
    from nemo_merge.evaluate import evaluate

    extra: dict[str, float] = {}
    time_report_writing(extra)

    def run() -> dict[str, Any]:
        report, _ = evaluate(eval_config(spec), progress=False)
        row = report["models"][0]
        return {**extra, "wer": row["wer"][SET] / 100, "utterances": row["stats"][SET]["utterances"]}

    return measure.timed(run)


def plain_loop(model_path: str, manifest: str, batch_size: int) -> dict[str, Any]:
    from nemo.collections.asr.metrics.wer import word_error_rate
    from nemo.collections.asr.models import ASRModel

    model = ASRModel.restore_from(model_path, map_location="cpu").eval()
    entries = [json.loads(line) for line in Path(manifest).read_text().splitlines() if line.strip()]
    hypotheses = model.transcribe([e["audio_filepath"] for e in entries], batch_size=batch_size, verbose=False)
    texts = [h.text for h in hypotheses]
    return {
        "wer": word_error_rate(texts, [e["text"] for e in entries]),
        "utterances": len(entries),
        "empty_hypotheses": sum(not t.strip() for t in texts),
    }


def child_plain(spec: dict[str, Any]) -> dict[str, Any]:
    prepare_child(spec)
    return measure.timed(lambda: plain_loop(spec["model"], spec["manifest"], spec["batch_size"]))


CHILDREN: dict[str, measure.ChildFn] = {"build": child_build, "ours": child_ours, "plain": child_plain}


# ------------------------------------------------------------------------ driver


@dataclass
class Plan:
    inputs: Inputs
    batch_size: int
    threads: int
    repeats: int
    quiet: measure.Quiet
    scratch: Path  # report folders and digest/transcript caches
    log: Path  # the children's stderr: NeMo's warnings, tracebacks


def spec_for(plan: Plan, kind: str, cache_dir: Path | None = None) -> dict[str, Any]:
    return {
        "kind": kind,
        "model": str(plan.inputs.model),
        "manifest": str(plan.inputs.manifest),
        "batch_size": plan.batch_size,
        "threads": plan.threads,
        "output_dir": tempfile.mkdtemp(prefix="report-", dir=plan.scratch),
        "cache": cache_dir is not None,
        "cache_dir": str(cache_dir) if cache_dir else None,
    }


def cold_digests(plan: Plan) -> dict[str, str]:
    """A fresh, empty digest cache: ours hashes the model file as a first run would."""
    return {"ASR_MERGE_CACHE": tempfile.mkdtemp(prefix="digests-", dir=plan.scratch)}


def run_ours(plan: Plan, variant: str, cache_dir: Path | None = None, retries: int | None = None) -> measure.Result:
    quiet = plan.quiet if retries is None else measure.Quiet(plan.quiet.wait_s, retries)
    return measure.run_quietly(MODULE, variant, spec_for(plan, "ours", cache_dir), quiet, cold_digests(plan), plan.log)


def run_plain(plan: Plan) -> measure.Result:
    return measure.run_quietly(MODULE, "plain", spec_for(plan, "plain"), plan.quiet, log=plan.log)


def run_rounds(plan: Plan) -> list[measure.Result]:
    """``plan.repeats`` rounds of ours and plain, alternating which goes first."""
    return measure.alternating_rounds([lambda: run_ours(plan, "ours (cache: false)"), lambda: run_plain(plan)], plan.repeats)


def run_cached(plan: Plan) -> list[measure.Result]:
    """ours with ``cache: true``: a run that fills a fresh cache, then a rerun from it."""
    print("cached rerun ...", flush=True)
    cache = Path(tempfile.mkdtemp(prefix="transcripts-", dir=plan.scratch))
    # never rerun the filling run: a second try would find the cache its first try filled
    fill = run_ours(plan, "ours (cache: fill)", cache, retries=0)
    return [fill, run_ours(plan, "ours (cache: rerun)", cache)]


# ------------------------------------------------------------------------- report


TABLE = [
    Column("variant", 20, "<"),
    Column("runs", 4),
    Column("work s best", 11),
    Column("median", 7),
    Column("cpu s", 6),
    Column("utt/s best", 10),
    Column("median", 7),
    Column("process s", 9),
    Column("peak priv GiB", 13),
    Column("other cpu", 9),
    Column("WER", 8),
]


@dataclass(frozen=True)
class Summary:
    """The runs of one variant."""

    variant: str
    runs: list[measure.Result]

    @property
    def best_s(self) -> float:
        return self.best.wall_s

    @property
    def best(self) -> measure.Result:
        return min(self.runs, key=lambda r: r.wall_s)

    @property
    def median_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def wers(self) -> set[float]:
        return {r.extra["wer"] for r in self.runs if "wer" in r.extra}


def summaries(results: list[measure.Result]) -> dict[str, Summary]:
    return {variant: Summary(variant, runs) for variant, runs in measure.by_variant(results).items()}


def table(by: dict[str, Summary], utterances: int) -> list[str]:
    rows = []
    for s in by.values():
        wer = ", ".join(f"{100 * w:.2f}%" for w in sorted(s.wers)) or "-"
        rows.append(
            [
                s.variant,
                str(len(s.runs)),
                f"{s.best_s:.2f}",
                f"{s.median_s:.2f}",
                f"{s.best.cpu_s:.2f}",
                f"{utterances / s.best_s:.1f}",
                f"{utterances / s.median_s:.1f}",
                f"{statistics.median(r.process_s for r in s.runs):.2f}",
                f"{measure.gib(max(r.peak_anon_kib for r in s.runs)):.3f}",
                f"{max(r.other_cores for r in s.runs):.2f}",
                wer,
            ]
        )
    return render_table(TABLE, rows)


def verdicts(by: dict[str, Summary]) -> list[str]:
    ours, plain = by["ours (cache: false)"], by["plain"]
    best, median = plain.best_s / ours.best_s, plain.median_s / ours.median_s
    wers = ours.wers | plain.wers
    report_s = ours.best.extra.get("report_s", 0.0)
    return [
        (f"{verdict(best >= 0.95)}  throughput ours / plain = {best:.3f} (best runs; target >= 0.95), "
         f"{median:.3f} (median runs)"),
        (f"      of ours' best run, {report_s:.2f} s went to writing report.json/.md/.png (a fixed cost per "
         f"invocation); without it the ratio would be {plain.best_s / (ours.best_s - report_s):.3f}"),
        f"{verdict(len(wers) == 1)}  WER ours = plain: "
        + (f"{100 * wers.pop():.4f}% in every run" if len(wers) == 1 else f"values differ: {sorted(wers)}"),
        (f"cached rerun: {by['ours (cache: rerun)'].best_s:.2f} s (filling run {by['ours (cache: fill)'].best_s:.2f} s, "
         f"uncached best {ours.best_s:.2f} s)"),
    ]


def header(plan: Plan, utterances: int, audio_s: float) -> list[str]:
    model_mb = plan.inputs.model.stat().st_size / 1e6
    return [
        (f"asr-merge eval vs plain NeMo loop: {utterances} espeak-ng utterances ({audio_s:.0f} s of audio), "
         f"tiny FastConformer-CTC-BPE babbler ({model_mb:.1f} MB .nemo), CPU, {plan.threads} torch thread(s), "
         f"batch size {plan.batch_size}; "
         f"{measure.machine_summary()}"),
        ("each run in a fresh process; work s = restore + transcribe + score (+ ours' checks, hashing and report "
         "files), imports excluded; cpu s = the best run's CPU time; process s = the child from start to exit (median); "
         f"{plan.repeats} rounds, order alternating; peak priv = max RssAnon over the runs; other cpu = most cores "
         f"other processes used during a run ({plan.quiet.describe()}); the children's stderr is in {plan.log}"),
    ]


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = measure.bench_parser(MODULE, __doc__)
    parser.add_argument("--utterances", type=int, default=400, help="utterances synthesized for the test set")
    parser.add_argument("--batch-size", type=int, default=16, help="transcribe batch size of both variants")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of both variants (default 1: on a shared machine several threads wait on each other "
        "whenever another process takes a core, and the timings scatter)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of ours and plain")
    measure.add_workdir_option(parser)
    measure.add_quiet_options(
        parser, wait_s=5.0, retries=0, note=" (default 0: the best of the rounds already discounts disturbed runs)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if measure.ran_as_child(args, CHILDREN):
        return
    started = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = args.workdir / "nemo_eval_bench.stderr.log"
    log.write_text("")
    inputs = ensure_inputs(args.workdir, args.utterances, log)
    quiet = measure.Quiet(args.quiet_wait, args.retries)
    with tempfile.TemporaryDirectory(prefix="nemo-eval-", dir=args.workdir) as scratch:
        plan = Plan(inputs, args.batch_size, args.threads, max(1, args.repeats), quiet, Path(scratch), log)
        results = run_rounds(plan) + run_cached(plan)
    entries = [json.loads(line) for line in inputs.manifest.read_text().splitlines() if line.strip()]
    by = summaries(results)
    print_report([header(plan, len(entries), sum(e["duration"] for e in entries)), table(by, len(entries)), verdicts(by)], started)


if __name__ == "__main__":
    main()
