"""Averaging ``.nemo`` experts: asr-merge's streaming merge against NeMo's checkpoint-averaging script.

What it measures
----------------
A FastConformer-CTC-BPE ``.nemo`` of a few hundred MB is built once with NeMo's own
API and cached in ``--workdir``: :func:`nemo_merge.models.build_model` on the tiny
config with ``d_model`` 512, 8 heads, 256 subsampling channels and ``--layers``
layers (12: ~310 MB), the tests' SentencePiece tokenizer, ``save_to``. Its BatchNorm
step counters are set to 1000 (a trained generalist); ``--experts`` experts are made
as ``benchmarks/synthetic.py`` makes them: the base plus N(0, 1e-3^2) deltas on every float
tensor (here except the never-trained preprocessor buffers), ``num_batches_tracked``
advanced by 100 x (i + 1) steps; each is saved with ``save_to``. Then, side by side in one run, each in a fresh child:

* ``ours``: :func:`merge_core.merge` of an ``average`` recipe of the experts with the
  base as template, output ``.nemo``; once hashing the inputs with a cold digest cache
  (``ASR_MERGE_CACHE`` a fresh empty folder) and once with ``hash_inputs: false``;
* ``legacy``: what NeMo's ``scripts/checkpoint_averaging/checkpoint_averaging.py``
  does: ``ASRModel.restore_from`` the base, ``torch.load`` every expert's
  ``model_weights.ckpt`` (extracted from its tar) fully into memory, sum every tensor
  (integer buffers included) keeping the previous checkpoint referenced while the
  next loads, divide the float ones by n, ``load_state_dict`` and ``save_to``.

Memory and time come from ``benchmarks/measure.py``: the parent samples the child's RssAnon
(private memory) and VmRSS every ~5 ms; ``work s`` is the merge alone, ``process s``
the child from start to exit (interpreter start-up and imports included: NeMo's
import is part of the legacy approach's cost, while ours never imports NeMo). Inputs
are read once beforehand, so every variant reads them from the page cache. The three
variants run in ``--repeats`` rounds, order alternating, and the fastest run of each
is shown; each run first waits for the CPUs to go quiet (``--retries`` reruns one
that other processes disturbed anyway).

Finally a checking child restores both outputs with ``ASRModel.restore_from``,
compares their float weights (max |ours - legacy|) and reads every BatchNorm's
``num_batches_tracked`` from the base, the experts and both outputs: ours copies the
base's counter, NeMo's script sums the experts' counters.

Usage: ``python -m benchmarks.nemo_merge_bench [--layers 12] [--experts 4] [--repeats 2]
[--workdir DIR] [--keep] [--quiet-wait 10] [--retries 0]``.
"""

from __future__ import annotations

import argparse
import posixpath
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import measure
from benchmarks.synthetic import Inputs, build_expert, child_ours
from benchmarks.tables import print_report, ratio_table, variant_table
from nemo_merge.testing import import_nemo_quietly

MODULE = __spec__.name  # every variant's child: python -m MODULE --run SPEC
FORMAT_VERSION = 1  # bump when the built models change, to invalidate cached inputs

D_MODEL, HEADS, SUB_CHANNELS = 512, 8, 256  # FastConformer-large widths
BASE_STEPS = 1000  # the generalist's BatchNorm step counter, as in benchmarks.synthetic's base
UNTRAINED = "preprocessor."  # the feature extractor's window and filterbank: never trained
COUNTER = "num_batches_tracked"
WEIGHTS_MEMBER = "model_weights.ckpt"


# ------------------------------------------------------------------------ inputs


def inputs_in(workdir: Path, layers: int, experts: int) -> Inputs:
    folder = workdir / f"nemo-merge-v{FORMAT_VERSION}-d{D_MODEL}-L{layers}"
    return Inputs(folder / "base.nemo", [folder / f"expert_{i}.nemo" for i in range(experts)])


def spec_inputs(spec: dict[str, Any]) -> Inputs:
    return Inputs(Path(spec["base"]), [Path(p) for p in spec["experts"]])


def model_overrides(layers: int) -> list[str]:
    return [
        f"model.encoder.d_model={D_MODEL}",
        f"model.encoder.n_heads={HEADS}",
        f"model.encoder.subsampling_conv_channels={SUB_CHANNELS}",
        f"model.encoder.n_layers={layers}",
    ]


def expert_state(base: dict[str, Any], index: int) -> dict[str, Any]:
    """benchmarks.synthetic's expert (small deltas, BN step counters moved on) of every tensor
    fine-tuning changes; the preprocessor's stay the base's."""
    trained = {name: t for name, t in base.items() if not name.startswith(UNTRAINED)}
    return {**base, **build_expert(trained, index)}


def build_inputs(inputs: Inputs, layers: int) -> None:
    """Build the base with NeMo's API and save it and its experts with ``save_to``."""
    import torch

    from nemo_merge.models import build_model
    from nemo_merge.testing import TINY_CONFIG, ensure_tokenizer, save_nemo

    model = build_model(TINY_CONFIG, ensure_tokenizer(inputs.base.parent), model_overrides(layers), seed=0)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(COUNTER):
                buffer.fill_(BASE_STEPS)
    base = {name: t.clone() for name, t in model.state_dict().items()}
    save_nemo(model, inputs.base)
    for i, path in enumerate(inputs.experts):
        model.load_state_dict(expert_state(base, i))
        save_nemo(model, path)


def child_build(spec: dict[str, Any]) -> dict[str, Any]:
    import_nemo_quietly()
    return measure.timed(lambda: build_inputs(spec_inputs(spec), spec["layers"]))


def ensure_inputs(workdir: Path, layers: int, experts: int, log: Path) -> Inputs:
    """Build the ``.nemo`` files in a child process unless they are cached already."""
    inputs = inputs_in(workdir, layers, experts)
    if all(p.is_file() for p in inputs.all()):
        return inputs
    inputs.base.parent.mkdir(parents=True, exist_ok=True)
    print(f"building base + {experts} experts in {inputs.base.parent} ...", flush=True)
    spec = {"kind": "build", "base": str(inputs.base), "experts": [str(p) for p in inputs.experts], "layers": layers}
    built = measure.run_child(MODULE, "build", spec, log=log)
    print(f"  built in {built.wall_s:.1f} s", flush=True)
    return inputs


# ------------------------------------------------------------------ child variants


def extract_weights(nemo: Path, folder: Path) -> Path:
    """Copy a ``.nemo``'s ``model_weights.ckpt`` out of its tar into ``folder``."""
    out = folder / f"{nemo.stem}-{WEIGHTS_MEMBER}"
    with tarfile.open(nemo, "r:*") as tar:
        member = next(m for m in tar.getmembers() if m.isfile() and posixpath.basename(m.name) == WEIGHTS_MEMBER)
        with tar.extractfile(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, measure.CHUNK)
    return out


def legacy_average(base: Path, experts: list[Path], output: Path) -> None:
    """NeMo's checkpoint_averaging.py, its statements kept: the experts' weights come
    from their ``.nemo`` files instead of Lightning ``.ckpt`` files beside the model."""
    import torch
    from nemo.collections.asr.models import ASRModel

    device = torch.device("cpu")
    nemo_model = ASRModel.restore_from(restore_path=str(base), map_location=device)
    n = len(experts)
    avg_state = None
    with tempfile.TemporaryDirectory(prefix="legacy-average-") as tmp:
        for ix, path in enumerate(experts):
            # as in the script, the previous checkpoint stays referenced while this one loads
            checkpoint = torch.load(extract_weights(path, Path(tmp)), map_location=device)
            if ix == 0:
                avg_state = checkpoint
            else:
                for k in avg_state:
                    avg_state[k] = avg_state[k] + checkpoint[k]
    for k in avg_state:
        if not str(avg_state[k].dtype).startswith("torch.int"):  # integer tensors are only accumulated
            avg_state[k] = avg_state[k] / n
    nemo_model.load_state_dict(avg_state, strict=True)
    nemo_model.save_to(str(output))


def child_legacy(spec: dict[str, Any]) -> dict[str, Any]:
    import_nemo_quietly()  # before the timer starts
    inputs = spec_inputs(spec)
    return measure.timed(lambda: legacy_average(inputs.base, inputs.experts, Path(spec["output"])))


def counters(state: dict[str, Any]) -> list[int]:
    """Every BatchNorm's ``num_batches_tracked``, in state-dict order."""
    return [int(t) for name, t in state.items() if name.endswith(COUNTER)]


def float_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Max |a - b| over the float tensors (both hold the same names)."""
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def check_outputs(inputs: Inputs, ours: Path, legacy: Path) -> dict[str, Any]:
    """Restore both outputs, compare their weights, and read every input's and output's BN counters."""
    import torch
    from nemo.collections.asr.models import ASRModel

    restored = {k: ASRModel.restore_from(str(p), map_location="cpu") for k, p in (("ours", ours), ("legacy", legacy))}
    states = {k: m.state_dict() for k, m in restored.items()}
    with tempfile.TemporaryDirectory(prefix="nemo-check-") as tmp:
        inputs_counters = [
            counters(torch.load(extract_weights(p, Path(tmp)), map_location="cpu", mmap=True)) for p in inputs.all()
        ]
    return {
        "classes": {k: type(m).__name__ for k, m in restored.items()},
        "max_abs_diff": float_diff(states["ours"], states["legacy"]),
        "float_tensors": sum(t.is_floating_point() for t in states["ours"].values()),
        "counters": {
            "base": inputs_counters[0],
            "experts": inputs_counters[1:],
            "ours": counters(states["ours"]),
            "legacy": counters(states["legacy"]),
        },
    }


def child_check(spec: dict[str, Any]) -> dict[str, Any]:
    import_nemo_quietly()
    return measure.timed(lambda: check_outputs(spec_inputs(spec), Path(spec["ours"]), Path(spec["legacy"])))


CHILDREN: dict[str, measure.ChildFn] = {
    "build": child_build,
    "ours": child_ours,  # benchmarks.synthetic's: finds the .nemo kind through nemo_merge's plugin, imports no NeMo
    "legacy": child_legacy,
    "check": child_check,
}


# ------------------------------------------------------------------------ driver


@dataclass
class Plan:
    inputs: Inputs
    outdir: Path
    quiet: measure.Quiet
    repeats: int
    log: Path  # the children's stderr: NeMo's warnings, tracebacks


def run_once(plan: Plan, variant: str, spec: dict[str, Any], caches: Path | None = None) -> measure.Result:
    """One quiet run, its output replacing the previous run's; with ``caches``, hashing
    starts from a fresh, empty digest cache folder made there."""
    Path(spec["output"]).unlink(missing_ok=True)
    env = {"ASR_MERGE_CACHE": tempfile.mkdtemp(prefix="cache-", dir=caches)} if caches else None
    return measure.run_quietly(MODULE, variant, spec, plan.quiet, env, plan.log)


def run_variants(plan: Plan, caches: Path) -> tuple[list[measure.Result], dict[str, Any]]:
    """ours (cold digest cache), ours without hashing and legacy in alternating rounds,
    the fastest run of each kept; then the outputs checked."""
    common = {"base": str(plan.inputs.base), "experts": [str(p) for p in plan.inputs.experts]}
    ours_out, legacy_out = plan.outdir / "ours.nemo", plan.outdir / "legacy.nemo"
    ours_spec = {**common, "kind": "ours", "method": "average", "parameters": {}, "output": str(ours_out)}
    legacy_spec = {**common, "kind": "legacy", "output": str(legacy_out)}
    runs = [
        lambda: run_once(plan, "ours", ours_spec, caches),
        lambda: run_once(plan, "ours, no hash", {**ours_spec, "hash_inputs": False}),
        lambda: run_once(plan, "legacy (NeMo script)", legacy_spec),
    ]
    results = measure.alternating_rounds(runs, plan.repeats)
    fastest = [min(rs, key=lambda r: r.wall_s) for rs in measure.by_variant(results).values()]
    print("checking the outputs ...", flush=True)
    check_spec = {**common, "kind": "check", "ours": str(ours_out), "legacy": str(legacy_out)}
    check = measure.run_child(MODULE, "check", check_spec, log=plan.log)
    return fastest, check.extra


# ------------------------------------------------------------------------- report


def uniform(values: list[int]) -> str:
    """One BatchNorm counter value when every layer has the same, else all of them."""
    return str(values[0]) if len(set(values)) == 1 else str(values)


def check_lines(check: dict[str, Any]) -> list[str]:
    c = check["counters"]
    experts = [uniform(v) for v in c["experts"]]
    expert_sum = [sum(col) for col in zip(*c["experts"])]
    return [
        (f"both outputs restore with ASRModel.restore_from: ours as {check['classes']['ours']}, "
         f"legacy as {check['classes']['legacy']}"),
        f"float weights: max |ours - legacy| = {check['max_abs_diff']:.2e} over {check['float_tensors']} float tensors",
        f"num_batches_tracked ({len(c['base'])} BatchNorms): base {uniform(c['base'])}, experts {', '.join(experts)}",
        f"  ours   {uniform(c['ours'])}: "
        + ("the base's counter, copied" if c["ours"] == c["base"] else "NOT the base's counter"),
        f"  legacy {uniform(c['legacy'])}: "
        + (
            "the experts' counters summed (NeMo's script accumulates integer tensors without dividing)"
            if c["legacy"] == expert_sum
            else "neither the base's counter nor the experts' sum"
        ),
    ]


def header(plan: Plan, layers: int, warm_s: float) -> list[str]:
    size = plan.inputs.base.stat().st_size
    total = sum(p.stat().st_size for p in plan.inputs.all())
    return [
        (f"asr-merge vs NeMo checkpoint averaging: average of {len(plan.inputs.experts)} .nemo experts, "
         f"{size / measure.MB:.1f} MB each (FastConformer-CTC-BPE, float32, {layers} layers, d={D_MODEL}); {measure.machine_summary()}"),
        (f"inputs {plan.inputs.base.parent} ({total / measure.MB:.0f} MB) read once beforehand in {warm_s:.2f} s: "
         "every variant reads from the page cache"),
        ("each variant in a fresh process; work s = the merge alone; process s = the child from start to exit "
         "(start-up and imports included); priv = RssAnon (private anonymous pages), sampled every 5 ms; "
         f"idle priv = RssAnon after imports; {plan.repeats} round(s) of the three variants, order alternating, "
         "the fastest run of each (by work s) shown; other cpu = cores used by other processes meanwhile "
         f"({plan.quiet.describe()}); the children's stderr is in {plan.log}"),
    ]


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = measure.bench_parser(MODULE, __doc__)
    parser.add_argument("--layers", type=int, default=12, help="Conformer layers of the model (12: ~310 MB)")
    parser.add_argument("--experts", type=int, default=4, help="number of experts averaged")
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds of the three variants, order alternating; the fastest is shown"
    )
    measure.add_workdir_option(parser)
    parser.add_argument("--keep", action="store_true", help="keep the two merged .nemo files in WORKDIR/out")
    measure.add_quiet_options(
        parser, wait_s=10.0, retries=0, note=" (default 0: the best of the rounds already discounts disturbed runs)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if measure.ran_as_child(args, CHILDREN):
        return
    started = time.perf_counter()
    outdir = args.workdir / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    log = outdir / "nemo_merge_bench.stderr.log"
    log.write_text("")
    inputs = ensure_inputs(args.workdir, args.layers, args.experts, log)
    plan = Plan(inputs, outdir, measure.Quiet(args.quiet_wait, args.retries), max(1, args.repeats), log)
    warm_s = measure.warm_page_cache(inputs.all())
    caches = Path(tempfile.mkdtemp(prefix="digest-caches-", dir=args.workdir))
    try:
        results, check = run_variants(plan, caches)
    finally:
        shutil.rmtree(caches, ignore_errors=True)
        if not args.keep:
            for name in ("ours.nemo", "legacy.nemo"):
                (outdir / name).unlink(missing_ok=True)
    sections = [header(plan, args.layers, warm_s), variant_table(results), ratio_table(results), check_lines(check)]
    print_report(sections, started)


if __name__ == "__main__":
    main()
