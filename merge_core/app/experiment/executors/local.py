"""The ``local`` executor: jobs in a pool of processes on this machine (no service to start)."""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any, Callable

from merge_core.app.experiment.executors import run_job
from merge_core.app.experiment.graph import Node


def _die_with_parent() -> None:
    """A worker killed with its driver (Linux), so a killed driver leaves no job running."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LocalExecutor:
    """Up to ``jobs`` jobs at once, each in a spawned process (a forked toolkit with live torch
    threads can deadlock); a process runs job after job, so the toolkit is imported once."""

    def __init__(self, jobs: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.capacity = jobs
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_die_with_parent)
        self.futures: dict[Future, str] = {}

    def submit(self, node: Node, fn: Callable[..., Any], args: tuple[Any, ...], log: Path) -> None:
        self.futures[self.pool.submit(run_job, str(log), node.resources.cpus, fn, args)] = node.id

    def wait(self, timeout: float) -> list[tuple[str, str | None]]:
        done, _ = wait_futures(list(self.futures), timeout=timeout, return_when=FIRST_COMPLETED)
        ended = []
        for future in done:
            error = future.exception()
            ended.append((self.futures.pop(future), None if error is None else f"{type(error).__name__}: {error}"))
        return ended

    def close(self, cancel: bool) -> None:
        if cancel:
            # Python 3.14's ProcessPoolExecutor.kill_workers(); before it, the pool's own processes
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.kill()
        self.pool.shutdown(wait=not cancel, cancel_futures=True)
