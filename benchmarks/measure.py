"""Measuring machinery shared by the benchmarks: each variant in a fresh child process.

How it measures
---------------
A benchmark module doubles as its own child: the parent runs
``python -m benchmarks.<name> --run SPEC`` (``SPEC`` a JSON object whose ``kind``
picks the variant) through :func:`run_child`, and the child calls :func:`child_main`, which
runs the variant inside :func:`timed` and prints one JSON line. So memory never
carries over from one variant to the next, and each variant imports what it needs
before the timer starts.

* The parent samples the child's ``/proc/PID/status`` every ~5 ms for the peaks of
  ``RssAnon`` (private, anonymous pages: the memory that cannot be reclaimed) and
  ``VmRSS`` (also counts memory-mapped file pages, which the kernel can drop), and
  times the whole process from start to exit (``process_s``: interpreter start-up
  and imports included).
* The child reports its own ``VmHWM`` (exact peak RSS), the wall and CPU time of the
  work alone (imports excluded) and its private memory right after the imports
  (``idle``).
* The machine may be shared: :func:`run_quietly` first waits for other processes to
  leave the CPUs idle (:func:`wait_for_quiet`, from ``/proc/stat``), reruns a variant
  during which they used the CPUs anyway, and keeps the least disturbed run; each
  :class:`Result` says how many cores others used meanwhile (``other_cores``).

The child inherits the parent's working folder and environment, so it imports the
``benchmarks`` package wherever the parent did. :func:`bench_parser`,
:func:`add_workdir_option` and :func:`add_quiet_options` give every benchmark the same
command-line options; :mod:`benchmarks.tables` formats the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1 << 30
MB = 10**6
CHUNK = 16 << 20
SAMPLE_S = 0.005
QUIET_CORES = 0.2  # other processes using fewer cores than this leave a run undisturbed
WORKDIR = Path(tempfile.gettempdir()) / "asr-merge-bench"  # where the benchmarks cache their inputs

ChildFn = Callable[[dict[str, Any]], dict[str, Any]]


# ------------------------------------------------------------- process and machine


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


def gib(kib: float) -> float:
    """KiB (as /proc reports them) in GiB."""
    return kib * 1024 / GIB


def machine_summary() -> str:
    """CPU model, core count and memory, for the line a README table quotes."""
    model, mem_kib = "unknown CPU", 0
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    with open("/proc/meminfo") as f:
        mem_kib = next((int(line.split()[1]) for line in f if line.startswith("MemTotal:")), 0)
    return f"{os.cpu_count()} CPUs ({model}), {gib(mem_kib):.0f} GiB RAM"


def read_all(paths: Sequence[Path], buf: bytearray) -> int:
    """Read every byte of ``paths`` into one reusable buffer; returns the byte count."""
    view = memoryview(buf)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def warm_page_cache(paths: Sequence[Path]) -> float:
    """Read ``paths`` once so that every variant reads them from the page cache; returns seconds."""
    start = time.perf_counter()
    read_all(paths, bytearray(CHUNK))
    return time.perf_counter() - start


# ------------------------------------------------------------------------ parent


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
    process_s: float = 0.0  # the child from start to exit: start-up and imports included


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


@dataclass(frozen=True)
class Quiet:
    """How hard to try for runs that other processes do not disturb."""

    wait_s: float  # before a run, wait up to this long for the CPUs to go idle
    retries: int  # rerun a run during which others used more than QUIET_CORES, this many times

    def describe(self) -> str:
        """The report's words for these settings."""
        return (f"each run first waits up to {self.wait_s:g} s for them to use < {QUIET_CORES}, "
                f"and is redone up to {self.retries} times if they used more")


def log_tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def run_child(
    module: str,
    variant: str,
    spec: dict[str, Any],
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
) -> Result:
    """Run ``python -m MODULE --run SPEC`` in a fresh interpreter (this one's working
    folder and environment), sampling its memory every ~5 ms. The child's stderr goes
    to ``log`` (appended) when given, else to ours."""
    cmd = [sys.executable, "-m", module, "--run", json.dumps(spec)]
    # stdout to a file, not a pipe: nobody reads a pipe while the child runs, and a full one would block it
    with tempfile.TemporaryFile("w+") as stdout, open(log, "a") if log else contextlib.nullcontext() as stderr:
        child_env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=child_env)
        sampler = Sampler(proc.pid)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            sampler.sample()
            time.sleep(SAMPLE_S)
        stdout.seek(0)
        out = stdout.read()
    process_s = time.monotonic() - sampler.start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    other = sampler.other_cores(usage.ru_utime + usage.ru_stime)
    if proc.returncode != 0:
        detail = f"; the end of its stderr ({log}):\n{log_tail(log)}" if log else ""
        raise RuntimeError(f"{variant}: child failed with exit status {proc.returncode}{detail}")
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
        process_s=process_s,
    )


def run_quietly(
    module: str,
    variant: str,
    spec: dict[str, Any],
    quiet: Quiet,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
) -> Result:
    """:func:`run_child`, rerun while other processes disturbed it; the least disturbed run."""
    runs: list[Result] = []
    for _ in range(quiet.retries + 1):
        load = wait_for_quiet(quiet.wait_s, QUIET_CORES)
        if load >= QUIET_CORES:
            print(f"  warning: other processes use {load:.1f} cores before {variant}", flush=True)
        runs.append(run_child(module, variant, spec, env, log))
        if runs[-1].other_cores < QUIET_CORES:
            break
        print(f"  {variant}: other processes used {runs[-1].other_cores:.2f} cores meanwhile", flush=True)
    return min(runs, key=lambda r: r.other_cores)


def alternating_rounds(runs: Sequence[Callable[[], Result]], rounds: int) -> list[Result]:
    """Every run once per round, in the given order on even rounds and reversed on odd
    ones, so that a slow drift of the machine does not favour whichever runs first."""
    results = []
    for r in range(rounds):
        print(f"round {r + 1} of {rounds} ...", flush=True)
        results += [run() for run in (runs if r % 2 == 0 else runs[::-1])]
    return results


def by_variant(results: Sequence[Result]) -> dict[str, list[Result]]:
    """The runs of each variant, variants in order of first appearance."""
    grouped: dict[str, list[Result]] = {}
    for r in results:
        grouped.setdefault(r.variant, []).append(r)
    return grouped


# ------------------------------------------------------------------------- child


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


def child_main(raw: str, children: Mapping[str, ChildFn]) -> None:
    """The child's side of :func:`run_child`: run the variant ``spec["kind"]`` names
    (a function that returns :func:`timed`'s record) and print its record."""
    spec = json.loads(raw)
    print(json.dumps(children[spec["kind"]](spec)), flush=True)


# ------------------------------------------------------------------------ options



def ran_as_child(args: Any, children: Mapping[str, ChildFn]) -> bool:
    """When this process is a measured child (``--run SPEC``), run that variant and say so."""
    if args.run:
        child_main(args.run, children)
    return bool(args.run)

def bench_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The parser of benchmark ``module``, described by the first paragraph of its
    docstring ``doc``, with the hidden ``--run SPEC`` by which :func:`run_child` starts a child."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one variant in this (child) process
    return parser


def add_workdir_option(
    parser: argparse.ArgumentParser,
    default: Path | None = WORKDIR,
    about: str = "inputs are built once and cached here, by parameters (default: %(default)s)",
) -> None:
    parser.add_argument("--workdir", type=Path, default=default, help=about)


def add_quiet_options(parser: argparse.ArgumentParser, wait_s: float, retries: int, note: str = "") -> None:
    """``--quiet-wait`` and ``--retries``, which make the :class:`Quiet` of :func:`run_quietly`."""
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=wait_s,
        help="before each run wait up to this many seconds for other processes to leave the CPUs idle",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=retries,
        help=f"rerun a run during which other processes used over {QUIET_CORES} cores up to this many times{note}",
    )
