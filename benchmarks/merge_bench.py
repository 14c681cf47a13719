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

Every variant runs in a fresh child process (``merge_bench.py --run SPEC``) so
memory never carries over. The parent samples the child's ``/proc/PID/status``
every ~5 ms for the peaks of ``RssAnon`` (private, anonymous pages: the memory
that cannot be reclaimed, which is what the targets are judged by) and ``VmRSS``
(also counts memory-mapped file pages, which the kernel can drop); the child
reports its own ``VmHWM`` (exact peak RSS), its wall and CPU time of the work
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
* ``ties`` with ``trim_scope: tensor`` within 4x of the floor's time.

Ours and naive outputs are compared tensor by tensor (max |difference|, share of
differing entries); ``ties`` with ``trim_scope: model`` may differ at the trimming
threshold, since naive uses one exact global top-k per expert and ours its
streaming histogram.

Usage: ``python benchmarks/merge_bench.py [--size-mb 400] [--experts 4]
[--methods average,ties,dare_ties] [--workdir DIR] [--keep] [--quiet-wait 20] [--retries 2]``.
Inputs stay cached in the work folder (default ``/tmp/asr-merge-bench``) for reruns;
merged outputs are deleted after each comparison unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a source tree without installing

GIB = 1 << 30
MB = 10**6
CHUNK = 16 << 20
SAMPLE_S = 0.005
FLOOR_RUNS = 3
FORMAT_VERSION = 1  # bump when the synthetic model changes, to invalidate cached inputs

# FastConformer-large-like geometry
D_MODEL = 512
HEADS = 8
FF_MULT = 4
CONV_KERNEL = 9
SUB_CHANNELS = 256
FEATURES = 80
VOCAB = 1024
BASE_SCALE = 0.02
DELTA_SCALE = 1e-3

# method key -> (registered method, parameters)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "average": ("average", {}),
    "ties-tensor": ("ties", {"density": 0.2, "lambda": 1.0, "trim_scope": "tensor"}),
    "ties-model": ("ties", {"density": 0.2, "lambda": 1.0, "trim_scope": "model"}),
    "dare_ties": ("dare_ties", {"density": 0.5, "lambda": 1.0, "seed": 0}),
}
ALIASES = {"ties": ["ties-tensor", "ties-model"]}


# ----------------------------------------------------------------------------- model


Shape = tuple[int, ...]


def pre_encode_specs(d: int) -> dict[str, tuple[Shape, str]]:
    """dw_striding subsampling: 3 stride-2 conv stages, then a linear to d_model."""
    c = SUB_CHANNELS
    p = "encoder.pre_encode."
    specs = {p + "conv.0.weight": ((c, 1, 3, 3), "f32"), p + "conv.0.bias": ((c,), "f32")}
    for i in (2, 5):
        specs[p + f"conv.{i}.weight"] = ((c, 1, 3, 3), "f32")
        specs[p + f"conv.{i}.bias"] = ((c,), "f32")
        specs[p + f"conv.{i + 1}.weight"] = ((c, c, 1, 1), "f32")
        specs[p + f"conv.{i + 1}.bias"] = ((c,), "f32")
    specs[p + "out.weight"] = ((d, c * (FEATURES // 8)), "f32")
    specs[p + "out.bias"] = ((d,), "f32")
    return specs


def layer_specs(i: int, d: int) -> dict[str, tuple[Shape, str]]:
    """One Conformer layer: macaron feed-forwards, relative-position attention, conv module."""
    p = f"encoder.layers.{i}."
    specs: dict[str, tuple[Shape, str]] = {}

    def norm(name: str) -> None:
        specs[p + name + ".weight"] = ((d,), "f32")
        specs[p + name + ".bias"] = ((d,), "f32")

    def feed_forward(name: str) -> None:
        norm("norm_" + name)
        specs[p + name + ".linear1.weight"] = ((FF_MULT * d, d), "f32")
        specs[p + name + ".linear1.bias"] = ((FF_MULT * d,), "f32")
        specs[p + name + ".linear2.weight"] = ((d, FF_MULT * d), "f32")
        specs[p + name + ".linear2.bias"] = ((d,), "f32")

    feed_forward("feed_forward1")
    norm("norm_conv")
    specs[p + "conv.pointwise_conv1.weight"] = ((2 * d, d, 1), "f32")
    specs[p + "conv.pointwise_conv1.bias"] = ((2 * d,), "f32")
    specs[p + "conv.depthwise_conv.weight"] = ((d, 1, CONV_KERNEL), "f32")
    specs[p + "conv.depthwise_conv.bias"] = ((d,), "f32")
    for stat in ("weight", "bias", "running_mean", "running_var"):
        specs[p + f"conv.batch_norm.{stat}"] = ((d,), "f32")
    specs[p + "conv.batch_norm.num_batches_tracked"] = ((), "i64")
    specs[p + "conv.pointwise_conv2.weight"] = ((d, d, 1), "f32")
    specs[p + "conv.pointwise_conv2.bias"] = ((d,), "f32")
    norm("norm_self_att")
    specs[p + "self_attn.pos_bias_u"] = ((HEADS, d // HEADS), "f32")
    specs[p + "self_attn.pos_bias_v"] = ((HEADS, d // HEADS), "f32")
    for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
        specs[p + f"self_attn.{lin}.weight"] = ((d, d), "f32")
        specs[p + f"self_attn.{lin}.bias"] = ((d,), "f32")
    specs[p + "self_attn.linear_pos.weight"] = ((d, d), "f32")
    feed_forward("feed_forward2")
    norm("norm_out")
    return specs


def decoder_specs(d: int) -> dict[str, tuple[Shape, str]]:
    return {
        "decoder.decoder_layers.0.weight": ((VOCAB + 1, d, 1), "f32"),
        "decoder.decoder_layers.0.bias": ((VOCAB + 1,), "f32"),
    }


def nbytes(specs: dict[str, tuple[Shape, str]]) -> int:
    return sum(math.prod(shape) * (8 if kind == "i64" else 4) for shape, kind in specs.values())


def layers_for_size(size_mb: float, d: int) -> int:
    fixed = nbytes(pre_encode_specs(d)) + nbytes(decoder_specs(d))
    return max(1, round((size_mb * MB - fixed) / nbytes(layer_specs(0, d))))


def model_specs(size_mb: float, d: int = D_MODEL) -> dict[str, tuple[Shape, str]]:
    specs = pre_encode_specs(d)
    for i in range(layers_for_size(size_mb, d)):
        specs.update(layer_specs(i, d))
    specs.update(decoder_specs(d))
    return specs


def largest_tensor_bytes(specs: dict[str, tuple[Shape, str]]) -> int:
    return max(nbytes({k: v}) for k, v in specs.items())


# ------------------------------------------------------------------------ building


def base_tensor(name: str, shape: Shape, kind: str, g: Any) -> Any:
    import torch

    if kind == "i64":
        return torch.tensor(1000, dtype=torch.int64)
    if name.endswith("running_var"):
        return torch.rand(shape, generator=g) + 0.5
    if name.endswith(".weight") and len(shape) == 1:  # norm scales
        return 1 + 0.01 * torch.randn(shape, generator=g)
    return BASE_SCALE * torch.randn(shape, generator=g)


def build_base(specs: dict[str, tuple[Shape, str]]) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    return {name: base_tensor(name, shape, kind, g) for name, (shape, kind) in specs.items()}


def build_expert(base: dict[str, Any], index: int) -> dict[str, Any]:
    """The base plus N(0, DELTA_SCALE^2) deltas; the BN step counter moves on too."""
    import torch

    g = torch.Generator().manual_seed(1000 + index)
    out = {}
    for name, t in base.items():
        if t.is_floating_point():
            out[name] = t + DELTA_SCALE * torch.randn(t.shape, generator=g)
        else:
            out[name] = t + 100 * (index + 1)
    return out


def save_atomic(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Inputs:
    base: Path
    experts: list[Path]

    def all(self) -> list[Path]:
        return [self.base, *self.experts]


def ensure_inputs(workdir: Path, size_mb: float, experts: int) -> Inputs:
    """Build missing checkpoints; files already there for these parameters are reused."""
    folder = workdir / f"inputs-v{FORMAT_VERSION}-d{D_MODEL}-{size_mb:g}MB"
    folder.mkdir(parents=True, exist_ok=True)
    inputs = Inputs(folder / "base.safetensors", [folder / f"expert_{i}.safetensors" for i in range(experts)])
    missing = [p for p in inputs.all() if not p.is_file()]
    if not missing:
        return inputs
    print(f"building {len(missing)} synthetic checkpoint(s) in {folder} ...", flush=True)
    start = time.perf_counter()
    base = build_base(model_specs(size_mb))
    if not inputs.base.is_file():
        save_atomic(base, inputs.base)
    for i, path in enumerate(inputs.experts):
        if not path.is_file():
            save_atomic(build_expert(base, i), path)
    print(f"  built in {time.perf_counter() - start:.1f} s", flush=True)
    return inputs


# ---------------------------------------------------------------------- measuring


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Memory fields of /proc/PID/status in KiB (empty once the process is gone)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    fields[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return fields


def read_all(paths: list[Path], buf: bytearray) -> int:
    """Read every byte of ``paths`` into one reusable buffer; returns the byte count."""
    view = memoryview(buf)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def write_bytes(path: Path, size: int, buf: bytearray) -> None:
    view = memoryview(buf)
    with open(path, "wb", buffering=0) as f:
        left = size
        while left:
            left -= f.write(view[: min(left, len(view))])


def cpu_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores; steal counts as busy)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_for_quiet(max_wait_s: float, threshold: float) -> float:
    """Wait until other processes use under ``threshold`` cores (over 0.5 s windows);
    returns the load seen last, in cores."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy, own, start = cpu_busy_s(), own_cpu_s(), time.monotonic()
        time.sleep(0.5)
        load = (cpu_busy_s() - busy - (own_cpu_s() - own)) / (time.monotonic() - start)
        if load < threshold or time.monotonic() > deadline:
            return load


@dataclass
class Result:
    variant: str
    wall_s: float
    cpu_s: float
    peak_rss_kib: int
    peak_anon_kib: int
    idle_anon_kib: int
    other_cores: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sampler:
    """Peaks of a process's RssAnon and VmRSS, and the CPU others used meanwhile."""

    pid: int
    peak_anon: int = 0
    peak_rss: int = 0
    busy0: float = field(default_factory=cpu_busy_s)
    own0: float = field(default_factory=own_cpu_s)
    start: float = field(default_factory=time.monotonic)

    def sample(self) -> None:
        status = proc_status(self.pid)
        self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
        self.peak_rss = max(self.peak_rss, status.get("VmRSS", 0))

    def other_cores(self, child_cpu_s: float) -> float:
        """Cores used by processes other than the child and this sampler, on average."""
        other = cpu_busy_s() - self.busy0 - (own_cpu_s() - self.own0) - child_cpu_s
        return max(0.0, other / max(time.monotonic() - self.start, 1e-9))


QUIET_CORES = 0.2


@dataclass(frozen=True)
class Quiet:
    """How hard to try for runs that other processes do not disturb."""

    wait_s: float  # before a run, wait up to this long for the CPUs to go idle
    retries: int  # rerun a run during which others used more than QUIET_CORES, this many times


def run_quietly(variant: str, spec: dict[str, Any], quiet: Quiet, env: dict[str, str] | None = None) -> Result:
    """:func:`run_child`, rerun while other processes disturbed it; the least disturbed run."""
    runs: list[Result] = []
    for attempt in range(quiet.retries + 1):
        load = wait_for_quiet(quiet.wait_s, QUIET_CORES)
        if load >= QUIET_CORES:
            print(f"  warning: other processes use {load:.1f} cores before {variant}", flush=True)
        runs.append(run_child(variant, spec, env))
        if runs[-1].other_cores < QUIET_CORES:
            break
        print(f"  {variant}: other processes used {runs[-1].other_cores:.2f} cores meanwhile", flush=True)
    return min(runs, key=lambda r: r.other_cores)


def run_child(variant: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> Result:
    """Run one variant in a fresh interpreter, sampling its memory every ~5 ms."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    sampler = Sampler(proc.pid)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        sampler.sample()
        time.sleep(SAMPLE_S)
    proc.returncode = os.waitstatus_to_exitcode(status)
    other = sampler.other_cores(usage.ru_utime + usage.ru_stime)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{variant}: child failed with exit status {proc.returncode}")
    report = json.loads(out.strip().splitlines()[-1])
    return Result(
        variant=variant,
        wall_s=report["wall_s"],
        cpu_s=report["cpu_s"],
        peak_rss_kib=max(sampler.peak_rss, report["vmhwm_kib"]),
        peak_anon_kib=max(sampler.peak_anon, report["end_anon_kib"]),
        idle_anon_kib=report["idle_anon_kib"],
        other_cores=other,
        extra=report.get("extra", {}),
    )


# ------------------------------------------------------------------ child variants


def timed(work: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
    """Run ``work`` and describe it for the parent (one JSON line on stdout)."""
    idle = proc_status().get("RssAnon", 0)
    wall, cpu = time.perf_counter(), own_cpu_s()
    extra = work() or {}
    wall, cpu = time.perf_counter() - wall, own_cpu_s() - cpu
    status = proc_status()
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "vmhwm_kib": status.get("VmHWM", 0),
        "end_anon_kib": status.get("RssAnon", 0),
        "idle_anon_kib": idle,
        "extra": extra,
    }


def child_floor(spec: dict[str, Any]) -> dict[str, Any]:
    buf = bytearray(CHUNK)

    def work() -> None:
        read_all([Path(p) for p in spec["inputs"]], buf)
        write_bytes(Path(spec["output"]), spec["output_bytes"], buf)

    return timed(work)


def naive_model_trim(
    base: dict[str, Any], experts: list[dict[str, Any]], names: list[str], density: float
) -> list[dict[str, Any]]:
    """Model-wide trimming done the in-memory way: per expert, one exact top-k over
    the whole flattened task vector; returns per-expert, per-name keep masks."""
    import torch

    from merge_core.sparsify import kept_count

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

    from merge_core.registry import TensorInputs, get_method
    from merge_core.sparsify import magnitude_trim

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
            trim = lambda tau, i, d: magnitude_trim(tau, d)  # noqa: E731
        else:
            trim = lambda tau, i, d, n=name: torch.where(masks[i][n], tau, 0)  # noqa: E731
        inputs = TensorInputs(name=name, base=t, models=[e[name] for e in experts], weights=weights, trim=trim)
        merged[name] = method.fn(inputs, params).to(t.dtype)
    save_file(merged, spec["output"])


def child_naive(spec: dict[str, Any]) -> dict[str, Any]:
    import merge_core.methods  # noqa: F401  (imports before the idle reading)
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    return timed(lambda: naive_merge(spec))


def child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    from merge_core import Recipe, merge

    recipe = Recipe.from_mapping(
        {
            "method": spec["method"],
            "base_model": spec["base"],
            "models": [{"model": p, "weight": 1.0} for p in spec["experts"]],
            "parameters": spec["parameters"],
            "output": spec["output"],
            "hash_inputs": spec.get("hash_inputs", True),
        }
    )
    return timed(lambda: {"merge_seconds": merge(recipe, progress=False).seconds})


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "floor": child_floor,
    "naive": child_naive,
    "ours": child_ours,
}


def child_main(raw: str) -> None:
    spec = json.loads(raw)
    print(json.dumps(CHILDREN[spec["kind"]](spec)), flush=True)


# ---------------------------------------------------------------------- comparing


def compare_outputs(a: Path, b: Path) -> tuple[float, float]:
    """Max |a - b| over all tensors, and the share of entries that differ."""
    import torch
    from safetensors import safe_open

    worst, differing, total = 0.0, 0, 0
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            raise AssertionError(f"{a} and {b} hold different tensor names")
        for name in fa.keys():
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
    quiet: Quiet
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


def run_floor(plan: Plan) -> Result:
    output = plan.outdir / "floor.bin"
    spec = {
        "kind": "floor",
        "inputs": [str(p) for p in plan.inputs.all()],
        "output": str(output),
        "output_bytes": plan.inputs.base.stat().st_size,
    }
    runs = []
    for _ in range(FLOOR_RUNS):
        runs.append(run_quietly("floor (read all, write 1)", spec, plan.quiet))
        output.unlink(missing_ok=True)
    return min(runs, key=lambda r: r.wall_s)


def run_method(plan: Plan, key: str, caches: Path) -> list[Result]:
    """naive, ours (cold digest cache), ours without input hashing, ours (warm cache,
    average only); outputs compared."""
    naive_out, ours_out = plan.outdir / f"naive-{key}.safetensors", plan.outdir / f"ours-{key}.safetensors"
    naive = run_quietly(f"naive {key}", {**common_spec(plan, "naive", key), "output": str(naive_out)}, plan.quiet)
    cache = Path(tempfile.mkdtemp(prefix=f"cache-{key}-", dir=caches))
    ours_spec = {**common_spec(plan, "ours", key), "output": str(ours_out)}
    ours = run_quietly(f"ours {key}", ours_spec, plan.quiet, env={"ASR_MERGE_CACHE": str(cache)})
    ours.extra["max_abs_diff"], ours.extra["differing"] = compare_outputs(ours_out, naive_out)
    discard(naive_out, plan.keep)
    ours_out.unlink(missing_ok=True)
    unhashed = run_quietly(f"ours {key}, no hash", {**ours_spec, "hash_inputs": False}, plan.quiet)
    results = [naive, ours, unhashed]
    if key == "average":
        ours_out.unlink(missing_ok=True)
        warm = run_quietly(f"ours {key}, warm cache", ours_spec, plan.quiet, env={"ASR_MERGE_CACHE": str(cache)})
        results.append(warm)
    discard(ours_out, plan.keep)
    return results


def warm_page_cache(inputs: Inputs) -> float:
    start = time.perf_counter()
    read_all(inputs.all(), bytearray(CHUNK))
    return time.perf_counter() - start


# ------------------------------------------------------------------------- report


def gib(kib: float) -> float:
    return kib * 1024 / GIB


def table(results: list[Result], floor: Result) -> list[str]:
    naive_anon = {r.variant.split()[1]: r.peak_anon_kib for r in results if r.variant.startswith("naive")}
    head = (
        f"{'variant':<28} {'wall s':>7} {'cpu s':>7} {'peak RSS GiB':>12} {'peak priv GiB':>13} "
        f"{'idle priv':>9} {'time/floor':>10} {'priv/naive':>10} {'other cpu':>9}  {'max|ours-naive| (differing)'}"
    )
    lines = [head, "-" * len(head)]
    for r in [floor, *results]:
        key = r.variant.split()[1].rstrip(",") if " " in r.variant and not r.variant.startswith("floor") else None
        ratio = f"{r.peak_anon_kib / naive_anon[key]:.2f}" if key in naive_anon else "-"
        diff = r.extra.get("max_abs_diff")
        diff_text = f"{diff:.2e} ({100 * r.extra['differing']:.3f}%)" if diff is not None else ""
        lines.append(
            f"{r.variant:<28} {r.wall_s:>7.2f} {r.cpu_s:>7.2f} {gib(r.peak_rss_kib):>12.3f} "
            f"{gib(r.peak_anon_kib):>13.3f} {gib(r.idle_anon_kib):>9.3f} {r.wall_s / floor.wall_s:>10.2f} "
            f"{ratio:>10} {r.other_cores:>9.2f}  {diff_text}"
        )
    return lines


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def targets(results: list[Result], floor: Result, plan: Plan, experts: int) -> list[str]:
    by = {r.variant: r for r in results}
    bound = plan.model_bytes + (experts + 2) * plan.largest_bytes
    lines = [
        f"model size {plan.model_bytes / MB:.1f} MB ({plan.model_bytes / GIB:.3f} GiB), "
        f"largest tensor {plan.largest_bytes / MB:.2f} MB, "
        f"bound model + (n+2) x largest = {bound / MB:.1f} MB ({bound / GIB:.3f} GiB), n = {experts}"
    ]
    note = "" if experts == 4 else f" (target stated for 4 experts; run has {experts})"
    for r in results:
        if not r.variant.startswith("ours ") or "warm" in r.variant:
            continue
        key = r.variant.split()[1].rstrip(",")
        naive = by[f"naive {key}"]
        ratio = r.peak_anon_kib / naive.peak_anon_kib
        lines.append(
            f"{verdict(ratio <= 0.5)}  {key}: private ours {gib(r.peak_anon_kib):.3f} GiB <= 0.5 x naive "
            f"{gib(naive.peak_anon_kib):.3f} GiB (ratio {ratio:.2f}){note}"
        )
        working = (r.peak_anon_kib - r.idle_anon_kib) * 1024
        lines.append(
            f"{verdict(r.peak_anon_kib * 1024 < bound)}  {key}: private ours {r.peak_anon_kib * 1024 / MB:.1f} MB "
            f"< bound {bound / MB:.1f} MB ({r.idle_anon_kib * 1024 / MB:.1f} MB of it is interpreter + torch "
            f"after imports; the merge's own {working / MB:.1f} MB = {working / plan.largest_bytes:.1f} x largest)"
        )
    for key, limit in (("average", 1.5), ("ties-tensor", 4.0)):
        for variant in (f"ours {key}", f"ours {key}, no hash"):
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=400.0, help="approximate size of each checkpoint (MB)")
    parser.add_argument("--experts", type=int, default=4, help="number of experts besides the base")
    parser.add_argument(
        "--methods",
        default="average,ties,dare_ties",
        help="comma list of average, ties (both scopes), ties-tensor, ties-model, dare_ties",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "asr-merge-bench",
        help="inputs are built once and cached here, by parameters (default: %(default)s)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the merged outputs in WORKDIR/out instead of deleting each after use"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each run wait up to this many seconds for other processes to leave the CPUs idle",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help=f"rerun a run during which other processes used over {QUIET_CORES} cores up to this many times",
    )
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one variant in this (child) process
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> Plan:
    specs = model_specs(args.size_mb)
    inputs = ensure_inputs(args.workdir, args.size_mb, args.experts)
    outdir = args.workdir / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    quiet = Quiet(args.quiet_wait, args.retries)
    return Plan(inputs, outdir, args.keep, quiet, nbytes(specs), largest_tensor_bytes(specs))


def header(plan: Plan, args: argparse.Namespace, warm_s: float) -> list[str]:
    total = sum(p.stat().st_size for p in plan.inputs.all())
    tensors, layers = len(model_specs(args.size_mb)), layers_for_size(args.size_mb, D_MODEL)
    return [
        f"asr-merge benchmark: base + {args.experts} experts, {plan.model_bytes / MB:.1f} MB each "
        f"(float32, {tensors} tensors, {layers} layers, d={D_MODEL}), {os.cpu_count()} CPUs, torch threads default",
        f"inputs {plan.inputs.base.parent} ({total / GIB:.2f} GiB) read once beforehand in {warm_s:.2f} s: "
        "every variant reads from the page cache",
        "each variant in a fresh process; wall/cpu exclude interpreter start-up and imports; "
        "priv = RssAnon (private anonymous pages), sampled every 5 ms; idle priv = RssAnon after imports; "
        "ours runs with a cold digest cache unless marked warm; floor is the best of "
        f"{FLOOR_RUNS} runs; other cpu = cores used by other processes meanwhile (each run first waits up "
        f"to {plan.quiet.wait_s:g} s for them to use < {QUIET_CORES}, and is redone up to {plan.quiet.retries} "
        "times if they used more meanwhile; the least disturbed run is shown)",
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.run:
        child_main(args.run)
        return
    keys = method_keys(args.methods)
    started = time.perf_counter()
    plan = prepare(args)
    warm_s = warm_page_cache(plan.inputs)
    caches = Path(tempfile.mkdtemp(prefix="digest-caches-", dir=args.workdir))
    try:
        floor = run_floor(plan)
        results: list[Result] = []
        for key in keys:
            print(f"running {key} ...", flush=True)
            results += run_method(plan, key, caches)
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    print()
    report = [*header(plan, args, warm_s), "", *table(results, floor), "", *targets(results, floor, plan, args.experts)]
    print("\n".join(report))
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
