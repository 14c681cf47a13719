"""The smoke experiment on the ``local`` executor against the same on Ray (a local Ray
started by the run): Ray's scheduling overhead as a wall-time ratio, and peak memory.

What it measures
----------------
The smoke experiment (:mod:`merge_core.app.experiment.smoke`: two experts of two
fine-tuning steps, their average, four models x four test sets decoded) of each toolkit in
``--toolkits``, each run in a fresh child process (``benchmarks/measure.py``) with fresh
storage, alternating local and Ray for ``--rounds`` rounds. Both executors run two jobs at
once, one torch thread each. Reported per variant: the median wall time of the whole
``run_experiment`` (Ray's start and shutdown included), the ratio ray / local (target
<= 1.10), the driver's peak RSS and the machine's peak memory in use beyond what it used
before the run (``MemTotal - MemAvailable``, sampled every 50 ms: the workers, and Ray's
GCS and raylet, included). The reports' WERs must be identical.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import measure
from benchmarks.tables import Column, render_table

MODULE = "benchmarks.experiment_executors"
EXECUTORS = ("local", "ray")


def used_kib() -> int:
    info = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/meminfo", encoding="utf-8")}
    return info["MemTotal"] - info["MemAvailable"]


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    from merge_core.app.experiment import parse_experiment, run_experiment
    from merge_core.app.experiment.smoke import smoke_experiment

    storage = Path(tempfile.mkdtemp(prefix=f"{spec['toolkit']}-{spec['kind']}-", dir=spec["workdir"]))
    options = {"executor": "ray", "ray": {"num_cpus": 2}} if spec["kind"] == "ray" else {}
    experiment = parse_experiment(smoke_experiment(Path(spec["data"]), spec["toolkit"], storage, **options))
    before, peak, done = used_kib(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], used_kib() - before)

    def work() -> dict[str, Any]:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run_experiment(experiment, live=False)
        done.set()
        sampler.join()
        report = json.loads((storage / "report" / "report.json").read_text(encoding="utf-8"))
        return {"machine_peak_kib": peak[0], "wers": {m["name"]: m["wer"] for m in report["models"]}}

    return measure.timed(work)


CHILDREN = {kind: run_variant for kind in EXECUTORS}
COLUMNS = [Column("toolkit", 11, "<"), Column("executor", 8, "<"), Column("median wall s", 13), Column("runs", 4),
           Column("driver peak RSS GiB", 19), Column("machine peak GiB", 16)]


def main() -> None:
    parser = measure.bench_parser(MODULE, __doc__)
    parser.add_argument("--toolkits", nargs="+", default=["nemo", "speechbrain"], choices=["nemo", "speechbrain"])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each executor, alternating")
    measure.add_workdir_option(parser, default=None, about="corpus and storage go here (default: a new temporary folder)")
    measure.add_quiet_options(parser, wait_s=5.0, retries=0)
    args = parser.parse_args()
    if measure.ran_as_child(args, CHILDREN):
        return
    from merge_core.app.experiment.smoke import prepare_smoke_data

    started = time.perf_counter()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="experiment-executors-"))).resolve()
    data = prepare_smoke_data(workdir / "smoke")
    quiet, log = measure.Quiet(args.quiet_wait, args.retries), workdir / "children.log"
    rows, ratios = [], []
    for toolkit in args.toolkits:
        spec = {"toolkit": toolkit, "data": str(data), "workdir": str(workdir)}
        runs = [lambda kind=kind: measure.run_quietly(MODULE, kind, {**spec, "kind": kind}, quiet, log=log)
                for kind in EXECUTORS]
        results = measure.by_variant(measure.alternating_rounds(runs, args.rounds))
        wall = {kind: statistics.median(r.wall_s for r in results[kind]) for kind in EXECUTORS}
        for kind in EXECUTORS:
            rs = results[kind]
            rows.append([toolkit, kind, f"{wall[kind]:.1f}", str(len(rs)),
                         f"{max(r.peak_rss_kib for r in rs) / 2**20:.2f}",
                         f"{max(r.extra['machine_peak_kib'] for r in rs) / 2**20:.2f}"])
        same = all(r.extra["wers"] == results["local"][0].extra["wers"] for kind in EXECUTORS for r in results[kind])
        ratios.append(f"{toolkit}: ray / local wall time {wall['ray'] / wall['local']:.2f}x (target <= 1.10); "
                      f"reports identical: {same}")
    print(f"{measure.machine_summary()}; the smoke experiment, 2 jobs at once, 1 torch thread each")
    print("\n".join(render_table(COLUMNS, rows)))
    print("\n".join(ratios))
    print(f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
