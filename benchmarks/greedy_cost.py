"""Cost of one SMAcT trial (``asr-merge select``) against the naive trial it replaces.

What it measures
----------------
Built once in ``--workdir``: the NeMo manifest of the synthetic corpus's ``dev-clean``
(``asr-merge prepare-librispeech``) and ``--candidates`` perturbed copies of the
shipped generalist ``models/nemo_generalist.nemo`` (every float tensor outside the
preprocessor plus Gaussian noise of 1% of the tensor's standard deviation, seeded).
A trial scores the uniform average of the generalist and one candidate on the first
``--utterances`` dev utterances. Then, in one run, each variant in a fresh child
process (``benchmarks/measure.py``), CPU, ``--threads`` torch threads:

* ``smact``: what :func:`merge_core.recipes.greedy_soup.run_greedy_soup` does per trial: the
  candidate's tensors added to the running sum and divided, the result loaded into
  the model restored once (``load_state_dict``), encoder + decoder + decoding on the
  preprocessor features computed once. The one-off set-up (restore, features, M_0's
  WER) happens before the timer;
* ``naive``: per trial, ``asr-merge merge`` of an ``average`` recipe into a ``.nemo``
  (default settings, so input hashing is on, cached after the first trial),
  ``ASRModel.restore_from`` of it, ``transcribe`` of the same utterances, scoring.

Both compute the same averages, so their dev WERs must agree trial by trial. Reported:
the time of each trial (median and best over the candidates, and the median of its
parts: merge, restore, decode = transcribe or features-to-text + scoring), peak RSS and peak
private memory of each process, and the ratio naive / smact of the median trial.

The corpus (``--corpus``, default ``/work/data/corpus`` or ``data/corpus``) is built at the
default size when it has no ``LibriSpeech/dev-clean``.

Usage: ``python -m benchmarks.greedy_cost [--corpus DIR] [--utterances 80]
[--candidates 3] [--threads 1] [--workdir DIR] [--quiet-wait 5] [--retries 0]``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import measure
from benchmarks.tables import Column, render_table

MODULE = __spec__.name  # every variant's child: python -m MODULE --run SPEC
REPO = Path(__file__).resolve().parents[1]
GENERALIST = REPO / "models" / "nemo_generalist.nemo"
NOISE = 0.01  # of each tensor's standard deviation
# this project's machines keep the default-size corpus there; elsewhere the README's data/corpus
DEFAULT_CORPUS = next((p for p in (Path("/work/data/corpus"), REPO / "data" / "corpus") if p.is_dir()), REPO / "data" / "corpus")


# ------------------------------------------------------------------------ inputs


def perturbed_copy(source: Path, dest: Path, seed: int) -> Path:
    """``source`` with seeded Gaussian noise on every float tensor outside the preprocessor."""
    import torch

    from merge_core.checkpoint import open_checkpoint
    from merge_core.engine import write_stream

    generator = torch.Generator().manual_seed(seed)
    with open_checkpoint(source) as reader:

        def stream(order: list[str]):
            for name in order:
                t = reader.get(name)
                if t.is_floating_point() and t.numel() > 1 and not name.startswith("preprocessor."):
                    t = t + NOISE * t.float().std() * torch.randn(t.shape, generator=generator)
                yield name, t

        write_stream(dest, {"method": "perturb", "parameters": {"seed": seed}}, [("base", reader, None)], reader, {}, stream)
    return dest


def ensure_inputs(workdir: Path, corpus: Path, candidates: int) -> tuple[Path, list[Path]]:
    """The dev-clean manifest and the perturbed candidates, built once."""
    from merge_core.app.corpus import prepare_librispeech

    manifest = workdir / "manifests" / "dev_clean.json"
    if not (corpus / "LibriSpeech" / "dev-clean").is_dir():
        from merge_core.app.corpus import prepare_synthetic_corpus

        prepare_synthetic_corpus(corpus, size="default")  # ~1 min on 2 cores
    if not manifest.is_file():
        prepare_librispeech(corpus / "LibriSpeech", manifest.parent, splits=["dev-clean"], toolkit="nemo")
    paths = []
    for i in range(candidates):
        path = workdir / f"perturbed{i}.nemo"
        paths.append(path if path.is_file() else perturbed_copy(GENERALIST, path, seed=i))
    return manifest, paths


# ------------------------------------------------------------------------ children


def soup_recipe(spec: dict[str, Any]):
    from merge_core.recipes.greedy_soup import SoupRecipe

    return SoupRecipe.from_mapping({
        "method": "greedy_soup",
        "models": [str(GENERALIST), *spec["candidates"]],
        "dev": {"manifest": spec["manifest"], "max_utterances": spec["utterances"], "batch_size": 16, "device": "cpu",
                "log": str(Path(spec["workdir"]) / "unused.json")},
        "output": str(Path(spec["workdir"]) / "unused.nemo"),
    })


def child_smact(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from merge_core.engine import open_inputs, plan_actions
    from merge_core.recipes.greedy_soup import candidate_loader, dev_evaluator, template_soup

    torch.set_num_threads(spec["threads"])
    recipe = soup_recipe(spec)
    with open_inputs(recipe.candidates) as inputs:
        evaluate = dev_evaluator(inputs.template, recipe.dev)
        soup, merged = template_soup(plan_actions(recipe.candidates, inputs.template), inputs.template)
        load = candidate_loader(recipe.candidates, inputs, merged)
        total, state = soup.with_candidate(load(str(GENERALIST)))
        soup.keep(total)
        evaluate(state)  # M_0's WER: once per selection, not per trial

        def trials() -> dict[str, Any]:
            seconds, wers, parts = [], [], []
            for candidate in spec["candidates"]:
                start = time.perf_counter()
                _, trial = soup.with_candidate(load(candidate))
                merged = time.perf_counter()
                wers.append(evaluate(trial))
                seconds.append(time.perf_counter() - start)
                parts.append({"merge": merged - start, "decode": seconds[-1] - (merged - start)})
            return {"trial_s": seconds, "wers": wers, "parts": parts}

        return measure.timed(trials)


def child_naive(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from nemo.collections.asr.models import ASRModel

    from merge_core.app.cli import main as asr_merge
    from merge_core.evaluation.manifests import read_nemo_manifest
    from merge_core.evaluation.wer import score
    from nemo_merge.evaluate import hypothesis_text

    torch.set_num_threads(spec["threads"])
    utterances = read_nemo_manifest(spec["manifest"])[: spec["utterances"]]
    workdir = Path(spec["workdir"])

    def trial(i: int, candidate: str) -> tuple[float, dict[str, float]]:
        recipe = workdir / f"naive{i}.yaml"
        output = workdir / f"naive{i}.nemo"
        recipe.write_text(f"method: average\nmodels: [{GENERALIST}, {candidate}]\noutput: {output}\n")
        start = time.perf_counter()
        assert asr_merge(["merge", str(recipe), "-q"]) == 0
        merged = time.perf_counter()
        model = ASRModel.restore_from(str(output), map_location="cpu").eval()
        restored = time.perf_counter()
        with torch.inference_mode():
            hypotheses = model.transcribe([str(u.audio) for u in utterances], batch_size=16, num_workers=0, verbose=False)
        wer = score([u.text for u in utterances], [hypothesis_text(h) for h in hypotheses]).wer
        end = time.perf_counter()
        return wer, {"merge": merged - start, "restore": restored - merged, "decode": end - restored}

    def trials() -> dict[str, Any]:
        seconds, wers, parts = [], [], []
        for i, candidate in enumerate(spec["candidates"]):
            start = time.perf_counter()
            wer, part = trial(i, candidate)
            seconds.append(time.perf_counter() - start)
            wers.append(wer)
            parts.append(part)
        return {"trial_s": seconds, "wers": wers, "parts": parts}

    return measure.timed(trials)


CHILDREN: dict[str, measure.ChildFn] = {"smact": child_smact, "naive": child_naive}


# ------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Row:
    result: measure.Result

    @property
    def seconds(self) -> list[float]:
        return self.result.extra["trial_s"]

    def cells(self) -> list[str]:
        r = self.result
        wers = " ".join(f"{100 * w:.2f}" for w in r.extra["wers"])
        parts = {k: statistics.median(p.get(k, 0.0) for p in r.extra["parts"]) for k in ("merge", "restore", "decode")}
        return [
            r.variant, str(len(self.seconds)), f"{statistics.median(self.seconds):.3f}", f"{min(self.seconds):.3f}",
            *(f"{v:.3f}" for v in parts.values()),
            f"{measure.gib(r.peak_rss_kib):.2f}", f"{measure.gib(r.peak_anon_kib):.2f}", f"{r.other_cores:.2f}", wers,
        ]


COLUMNS = [
    Column("variant", 8, "<"), Column("trials", 6), Column("trial s median", 14), Column("best", 6),
    Column("merge", 6), Column("restore", 7), Column("decode", 6),
    Column("peak RSS GiB", 12), Column("peak priv GiB", 13), Column("other cpu", 9), Column("dev WER % per trial", 0, "<", 2),
]


def main() -> None:
    parser = measure.bench_parser(MODULE, __doc__)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="synthetic corpus (built there when missing)")
    parser.add_argument("--utterances", type=int, default=80, help="dev-clean utterances each trial decodes")
    parser.add_argument("--candidates", type=int, default=3, help="perturbed copies of the generalist: one trial each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both variants")
    measure.add_workdir_option(parser, default=None, about="inputs and outputs go here (default: a new temporary folder)")
    measure.add_quiet_options(parser, wait_s=5.0, retries=0)
    args = parser.parse_args()
    if args.run:
        measure.child_main(args.run, CHILDREN)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="greedy-cost-"))
    workdir.mkdir(parents=True, exist_ok=True)
    manifest, candidates = ensure_inputs(workdir, args.corpus, args.candidates)
    spec = {"manifest": str(manifest), "candidates": [str(c) for c in candidates], "utterances": args.utterances,
            "threads": args.threads, "workdir": str(workdir)}
    quiet, log = measure.Quiet(args.quiet_wait, args.retries), workdir / "children.log"
    rows = [Row(measure.run_quietly(MODULE, kind, {**spec, "kind": kind}, quiet, log=log)) for kind in ("smact", "naive")]
    from merge_core.evaluation.manifests import read_nemo_manifest

    used = len(read_nemo_manifest(manifest)[: args.utterances])
    print(f"{measure.machine_summary()}; {args.threads} torch thread(s); {used} dev-clean utterances; "
          f"shipped NeMo generalist + {args.candidates} perturbed copies; one trial = average of 2 models")
    print("\n".join(render_table(COLUMNS, [r.cells() for r in rows])))
    smact, naive = rows
    same = all(abs(a - b) < 1e-9 for a, b in zip(smact.result.extra["wers"], naive.result.extra["wers"]))
    print(f"naive / smact, median trial: {statistics.median(naive.seconds) / statistics.median(smact.seconds):.1f}x; "
          f"peak RSS naive / smact: {naive.result.peak_rss_kib / smact.result.peak_rss_kib:.2f}; "
          f"dev WERs identical: {same}")


if __name__ == "__main__":
    main()
