"""Time and memory of asr-merge's streaming merge against a naive in-memory merge.

What it measures
----------------
Synthetic float32 ``.safetensors`` checkpoints with FastConformer-like tensor names
and shapes (a base and ``--experts`` experts, each the base plus small random
deltas, about ``--size-mb`` MB each) are built once and cached in ``--workdir``.
Then, side by side in one run, for each method of ``--methods``:

* ``naive``: every state dict loaded fully into private memory
  (``safetensors.torch.load(Path(p).read_bytes())``), the same registered method
  function applied key by key in memory, the result saved with
  ``safetensors.torch.save_file``;
* ``ours``: :func:`merge_core.merge` on a recipe (memory-mapped reads, streaming
  write, SHA-256 provenance hashing on a background thread) with a cold digest
  cache (``ASR_MERGE_CACHE`` set to a fresh empty folder), and for ``average`` once
  more with the digest cache the cold run left behind (warm cache);
* ``floor``: no merge, just every input byte read once (``readinto`` a reusable
  buffer) and output-size bytes written once beside the outputs: the I/O that any
  merge must do. Best of three runs.

Every variant runs in a fresh child process (``python -m benchmarks.merge_bench --run
SPEC``; the machinery is in ``benchmarks/measure.py``, the synthetic checkpoints come
from ``benchmarks/synthetic.py``) so memory never carries over. The parent samples
the child's ``/proc/PID/status`` every ~5 ms for the peaks of ``RssAnon`` (private,
anonymous pages: the memory that cannot be reclaimed, which is what the targets are
judged by) and ``VmRSS`` (also counts memory-mapped file pages, which the kernel
can drop); the child reports its own ``VmHWM`` (exact peak RSS), its wall and CPU time of the work
alone (interpreter start-up and imports excluded) and its private memory right
after the imports (``idle``). Every input file is read once before the timed runs,
so all variants read from the page cache. The machine may be shared, so each run
first waits (up to ``--quiet-wait`` s) for other processes to leave the CPUs idle,
is redone (up to ``--retries`` times) when others used the CPUs during it, and the
table says how many cores others used during the run shown (``other cpu``).

Output is one table (wall s, CPU s, peak RSS, peak private, time / floor, private /
naive private) and a PASS/FAIL line per target:

* peak private memory of ours at most half the naive approach's (stated for 4 experts);
* peak private memory of ours below one model size + (n + 2) x the largest tensor;
* ``average`` within 1.5x of the floor's time;
* ``ties`` with ``trim_scope: tensor``, ``breadcrumbs`` and ``della`` within 4x of the
  floor's time.

Time targets are judged on the ``no hash`` runs (``hash_inputs: false``): SHA-256 of
every input is a fixed cost (about 1.5 s of one core for 1.9 GiB) that only the digest
cache removes.

Ours and naive outputs are compared tensor by tensor (max |difference|, share of
differing entries); ``ties`` with ``trim_scope: model`` may differ at the trimming
threshold, since naive uses one exact global top-k per expert and ours its
streaming histogram.

Usage: ``python -m benchmarks.merge_bench [--size-mb 400] [--experts 4]
[--methods average,ties,dare_ties,breadcrumbs,della] [--workdir DIR] [--keep] [--quiet-wait 20]
[--retries 2]``.
Inputs stay cached in the work folder (default ``/tmp/asr-merge-bench``) for reruns;
merged outputs are deleted after each comparison unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import measure
from benchmarks.synthetic import (
    D_MODEL,
    Inputs,
    child_ours,
    ensure_inputs,
    largest_tensor_bytes,
    layers_for_size,
    model_specs,
    nbytes,
)
from benchmarks.tables import Column, print_report, render_table, verdict

MODULE = __spec__.name  # every variant's child: python -m MODULE --run SPEC
FLOOR_RUNS = 3

# method key -> (registered method, parameters)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "average": ("average", {}),
    "ties-tensor": ("ties", {"density": 0.2, "lambda": 1.0, "trim_scope": "tensor"}),
    "ties-model": ("ties", {"density": 0.2, "lambda": 1.0, "trim_scope": "model"}),
    "dare_ties": ("dare_ties", {"density": 0.5, "lambda": 1.0, "seed": 0}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.9, "gamma": 0.01, "lambda": 1.0}),
    "della": ("della", {"density": 0.5, "epsilon": 0.15, "lambda": 1.0, "seed": 0}),
}
ALIASES = {"ties": ["ties-tensor", "ties-model"]}


# ---------------------------------------------------------------------- measuring


def write_bytes(path: Path, size: int, buf: bytearray) -> None:
    view = memoryview(buf)
    with open(path, "wb", buffering=0) as f:
        left = size
        while left:
            left -= f.write(view[: min(left, len(view))])


# ------------------------------------------------------------------ child variants


def child_floor(spec: dict[str, Any]) -> dict[str, Any]:
    buf = bytearray(measure.CHUNK)

    def work() -> None:
        measure.read_all([Path(p) for p in spec["inputs"]], buf)
        write_bytes(Path(spec["output"]), spec["output_bytes"], buf)

    return measure.timed(work)


def naive_model_trim(
    base: dict[str, Any], experts: list[dict[str, Any]], names: list[str], density: float
) -> list[dict[str, Any]]:
    """Model-wide trimming done the in-memory way: per expert, one exact top-k over
    the whole flattened task vector; returns per-expert, per-name keep masks."""
    import torch

    from merge_core.methods.sparsify import kept_count

    sizes = [base[n].numel() for n in names]
    masks = []
    for expert in experts:
        flat = torch.empty(sum(sizes), dtype=torch.float32)
        for part, n in zip(flat.split(sizes), names):
            torch.sub(expert[n].reshape(-1), base[n].reshape(-1), out=part).abs_()
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[flat.topk(kept_count(flat.numel(), density), sorted=False).indices] = True
        del flat
        masks.append({n: m.view(base[n].shape) for n, m in zip(names, keep.split(sizes))})
    return masks


def naive_merge(spec: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import load, save_file

    from merge_core.methods.sparsify import magnitude_trim
    from merge_core.registry import TensorInputs, get_method

    method = get_method(spec["method"])
    params = {**method.defaults, **spec["parameters"]}
    base = load(Path(spec["base"]).read_bytes())
    experts = [load(Path(p).read_bytes()) for p in spec["experts"]]
    names = [n for n, t in base.items() if t.is_floating_point()]
    masks = None
    if params.get("trim_scope") == "model":
        masks = naive_model_trim(base, experts, names, params["density"])
    weights = torch.tensor([1.0] * len(experts), dtype=torch.float64)
    merged = {}
    for name, t in base.items():
        if not t.is_floating_point():
            merged[name] = t
            continue
        if masks is None:
            trim = lambda tau, i, d: magnitude_trim(tau, d)
        else:
            trim = lambda tau, i, d, n=name: torch.where(masks[i][n], tau, 0)
        inputs = TensorInputs(name=name, base=t, models=[e[name] for e in experts], weights=weights, trim=trim)
        merged[name] = method.fn(inputs, params).to(t.dtype)
    save_file(merged, spec["output"])


def child_naive(spec: dict[str, Any]) -> dict[str, Any]:
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import merge_core.methods  # noqa: F401  (imports before the idle reading)

    return measure.timed(lambda: naive_merge(spec))


CHILDREN: dict[str, measure.ChildFn] = {
    "floor": child_floor,
    "naive": child_naive,
    "ours": child_ours,  # benchmarks.synthetic's
}


# ---------------------------------------------------------------------- comparing


def compare_outputs(a: Path, b: Path) -> tuple[float, float]:
    """Max |a - b| over all tensors, and the share of entries that differ."""
    from safetensors import safe_open

    worst, differing, total = 0.0, 0, 0
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        names = fa.keys()  # a safe_open handle is no mapping: it cannot be iterated itself
        if set(names) != set(fb.keys()):
            raise AssertionError(f"{a} and {b} hold different tensor names")
        for name in names:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.shape != y.shape or x.dtype != y.dtype:
                raise AssertionError(f"{name}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
            diff = (x.double() - y.double()).abs()
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
            differing += int((diff != 0).sum())
            total += diff.numel()
    return worst, differing / max(total, 1)


# ------------------------------------------------------------------------ driver


@dataclass
class Plan:
    inputs: Inputs
    outdir: Path
    keep: bool
    quiet: measure.Quiet
    model_bytes: int
    largest_bytes: int


def common_spec(plan: Plan, kind: str, key: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "kind": kind,
        "base": str(plan.inputs.base),
        "experts": [str(p) for p in plan.inputs.experts],
    }
    if key is not None:
        spec["method"], spec["parameters"] = METHODS[key][0], METHODS[key][1]
    return spec


def discard(path: Path, keep: bool) -> None:
    if not keep:
        path.unlink(missing_ok=True)


def run_floor(plan: Plan) -> measure.Result:
    output = plan.outdir / "floor.bin"
    spec = {
        "kind": "floor",
        "inputs": [str(p) for p in plan.inputs.all()],
        "output": str(output),
        "output_bytes": plan.inputs.base.stat().st_size,
    }
    runs = []
    for _ in range(FLOOR_RUNS):
        runs.append(measure.run_quietly(MODULE, "floor (read all, write 1)", spec, plan.quiet))
        output.unlink(missing_ok=True)
    return min(runs, key=lambda r: r.wall_s)


def run_method(plan: Plan, key: str, caches: Path) -> list[measure.Result]:
    """naive, ours (cold digest cache), ours without input hashing, ours (warm cache,
    average only); outputs compared."""
    naive_out, ours_out = plan.outdir / f"naive-{key}.safetensors", plan.outdir / f"ours-{key}.safetensors"
    naive_spec = {**common_spec(plan, "naive", key), "output": str(naive_out)}
    naive = measure.run_quietly(MODULE, f"naive {key}", naive_spec, plan.quiet)
    cache = Path(tempfile.mkdtemp(prefix=f"cache-{key}-", dir=caches))
    ours_spec = {**common_spec(plan, "ours", key), "output": str(ours_out)}
    ours = measure.run_quietly(MODULE, f"ours {key}", ours_spec, plan.quiet, env={"ASR_MERGE_CACHE": str(cache)})
    ours.extra["max_abs_diff"], ours.extra["differing"] = compare_outputs(ours_out, naive_out)
    discard(naive_out, plan.keep)
    ours_out.unlink(missing_ok=True)
    unhashed = measure.run_quietly(MODULE, f"ours {key}, no hash", {**ours_spec, "hash_inputs": False}, plan.quiet)
    results = [naive, ours, unhashed]
    if key == "average":
        ours_out.unlink(missing_ok=True)
        warm_env = {"ASR_MERGE_CACHE": str(cache)}
        warm = measure.run_quietly(MODULE, f"ours {key}, warm cache", ours_spec, plan.quiet, env=warm_env)
        results.append(warm)
    discard(ours_out, plan.keep)
    return results


# ------------------------------------------------------------------------- report


TABLE = [
    Column("variant", 28, "<"),
    Column("wall s", 7),
    Column("cpu s", 7),
    Column("peak RSS GiB", 12),
    Column("peak priv GiB", 13),
    Column("idle priv", 9),
    Column("time/floor", 10),
    Column("priv/naive", 10),
    Column("other cpu", 9),
    Column("max|ours-naive| (differing)", gap=2),
]


def table(results: list[measure.Result], floor: measure.Result) -> list[str]:
    naive_anon = {r.variant.split()[1]: r.peak_anon_kib for r in results if r.variant.startswith("naive")}
    rows = []
    for r in [floor, *results]:
        key = r.variant.split()[1].rstrip(",") if " " in r.variant and not r.variant.startswith("floor") else None
        ratio = f"{r.peak_anon_kib / naive_anon[key]:.2f}" if key in naive_anon else "-"
        diff = r.extra.get("max_abs_diff")
        diff_text = f"{diff:.2e} ({100 * r.extra['differing']:.3f}%)" if diff is not None else ""
        rows.append(
            [
                r.variant,
                f"{r.wall_s:.2f}",
                f"{r.cpu_s:.2f}",
                f"{measure.gib(r.peak_rss_kib):.3f}",
                f"{measure.gib(r.peak_anon_kib):.3f}",
                f"{measure.gib(r.idle_anon_kib):.3f}",
                f"{r.wall_s / floor.wall_s:.2f}",
                ratio,
                f"{r.other_cores:.2f}",
                diff_text,
            ]
        )
    return render_table(TABLE, rows)


def targets(results: list[measure.Result], floor: measure.Result, plan: Plan, experts: int) -> list[str]:
    by = {r.variant: r for r in results}
    bound = plan.model_bytes + (experts + 2) * plan.largest_bytes
    lines = [
        (f"model size {plan.model_bytes / measure.MB:.1f} MB ({plan.model_bytes / measure.GIB:.3f} GiB), "
         f"largest tensor {plan.largest_bytes / measure.MB:.2f} MB, "
         f"bound model + (n+2) x largest = {bound / measure.MB:.1f} MB ({bound / measure.GIB:.3f} GiB), n = {experts}")
    ]
    note = "" if experts == 4 else f" (target stated for 4 experts; run has {experts})"
    for r in results:
        if not r.variant.startswith("ours ") or "warm" in r.variant:
            continue
        key = r.variant.split()[1].rstrip(",")
        naive = by[f"naive {key}"]
        ratio = r.peak_anon_kib / naive.peak_anon_kib
        lines.append(
            f"{verdict(ratio <= 0.5)}  {key}: private ours {measure.gib(r.peak_anon_kib):.3f} GiB <= 0.5 x naive "
            f"{measure.gib(naive.peak_anon_kib):.3f} GiB (ratio {ratio:.2f}){note}"
        )
        working = (r.peak_anon_kib - r.idle_anon_kib) * 1024
        lines.append(
            f"{verdict(r.peak_anon_kib * 1024 < bound)}  {key}: private ours {r.peak_anon_kib * 1024 / measure.MB:.1f} MB "
            f"< bound {bound / measure.MB:.1f} MB ({r.idle_anon_kib * 1024 / measure.MB:.1f} MB of it is interpreter + torch "
            f"after imports; the merge's own {working / measure.MB:.1f} MB = {working / plan.largest_bytes:.1f} x largest)"
        )
    for key, limit in (("average", 1.5), ("ties-tensor", 4.0), ("breadcrumbs", 4.0), ("della", 4.0)):
        variant = f"ours {key}, no hash"  # hashing is a fixed cost outside the merge (see the docstring)
        if variant in by:
            r = by[variant]
            ratio = r.wall_s / floor.wall_s
            lines.append(
                f"{verdict(ratio <= limit)}  {variant}: time {r.wall_s:.2f} s <= {limit} x floor "
                f"{floor.wall_s:.2f} s (ratio {ratio:.2f})"
            )
    return lines


# --------------------------------------------------------------------------- main


def method_keys(text: str) -> list[str]:
    keys: list[str] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        for key in ALIASES.get(item, [item]):
            if key not in METHODS:
                raise SystemExit(f"unknown method {item!r}; choose from {', '.join([*METHODS, *ALIASES])}")
            keys.append(key)
    return list(dict.fromkeys(keys))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = measure.bench_parser(MODULE, __doc__)
    parser.add_argument("--size-mb", type=float, default=400.0, help="approximate size of each checkpoint (MB)")
    parser.add_argument("--experts", type=int, default=4, help="number of experts besides the base")
    parser.add_argument(
        "--methods",
        default="average,ties,dare_ties,breadcrumbs,della",
        help="comma list of average, ties (both scopes), ties-tensor, ties-model, dare_ties, breadcrumbs, della",
    )
    measure.add_workdir_option(parser)
    parser.add_argument(
        "--keep", action="store_true", help="keep the merged outputs in WORKDIR/out instead of deleting each after use"
    )
    measure.add_quiet_options(parser, wait_s=20.0, retries=2)
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> Plan:
    specs = model_specs(args.size_mb)
    inputs = ensure_inputs(args.workdir, args.size_mb, args.experts)
    outdir = args.workdir / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    quiet = measure.Quiet(args.quiet_wait, args.retries)
    return Plan(inputs, outdir, args.keep, quiet, nbytes(specs), largest_tensor_bytes(specs))


def header(plan: Plan, args: argparse.Namespace, warm_s: float) -> list[str]:
    total = sum(p.stat().st_size for p in plan.inputs.all())
    tensors, layers = len(model_specs(args.size_mb)), layers_for_size(args.size_mb, D_MODEL)
    return [
        (f"asr-merge benchmark: base + {args.experts} experts, {plan.model_bytes / measure.MB:.1f} MB each "
         f"(float32, {tensors} tensors, {layers} layers, d={D_MODEL}), {os.cpu_count()} CPUs, torch threads default"),
        (f"inputs {plan.inputs.base.parent} ({total / measure.GIB:.2f} GiB) read once beforehand in {warm_s:.2f} s: "
         "every variant reads from the page cache"),
        ("each variant in a fresh process; wall/cpu exclude interpreter start-up and imports; "
         "priv = RssAnon (private anonymous pages), sampled every 5 ms; idle priv = RssAnon after imports; "
         "ours runs with a cold digest cache unless marked warm; floor is the best of "
         f"{FLOOR_RUNS} runs; other cpu = cores used by other processes meanwhile (each run first waits up "
         f"to {plan.quiet.wait_s:g} s for them to use < {measure.QUIET_CORES}, and is redone up to {plan.quiet.retries} "
         "times if they used more meanwhile; the least disturbed run is shown)"),
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if measure.ran_as_child(args, CHILDREN):
        return
    keys = method_keys(args.methods)
    started = time.perf_counter()
    plan = prepare(args)
    warm_s = measure.warm_page_cache(plan.inputs.all())
    caches = Path(tempfile.mkdtemp(prefix="digest-caches-", dir=args.workdir))
    try:
        floor = run_floor(plan)
        results: list[measure.Result] = []
        for key in keys:
            print(f"running {key} ...", flush=True)
            results += run_method(plan, key, caches)
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    print_report([header(plan, args, warm_s), table(results, floor), targets(results, floor, plan, args.experts)], started)


if __name__ == "__main__":
    main()
