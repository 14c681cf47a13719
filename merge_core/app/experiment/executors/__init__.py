"""Where an experiment's jobs run: ``local`` (processes on this machine) or ``ray`` (tasks on a
Ray cluster). Both run :func:`run_job` in a worker; the driver's scheduling loop
(:func:`merge_core.app.experiment.runner.schedule`) submits a job when what it needs
exists and asks the executor which jobs have ended."""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Protocol

from merge_core.app.experiment.graph import Node


class Executor(Protocol):
    capacity: int | None  # jobs it runs at once (None: as many as are ready; its own queue holds the rest)

    def submit(self, node: Node, fn: Callable[..., Any], args: tuple[Any, ...], log: Path) -> None:
        """Start ``fn(*args)`` for ``node`` in a worker, its output to ``log``."""

    def wait(self, timeout: float) -> list[tuple[str, str | None]]:
        """The jobs ended within ``timeout`` seconds: (node id, error or None)."""

    def close(self, cancel: bool) -> None:
        """Release the workers; ``cancel``: stop the running jobs first."""


def run_job(log: str, threads: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run one job in this worker, its stdout and stderr appended to ``log``, torch on
    ``threads`` threads; ``<log>.pid`` names the process while it runs (every attempt
    appends a line to the log, so a retried job shows its attempts)."""
    import torch

    path = Path(log)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".pid").write_text(f"{os.getpid()}\n", encoding="utf-8")
    saved = os.dup(1), os.dup(2)
    with open(path, "a", encoding="utf-8") as out:
        out.write(f"--- attempt: pid {os.getpid()} on {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        out.flush()
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(out.fileno(), 1), os.dup2(out.fileno(), 2)
        try:
            torch.set_num_threads(threads)
            fn(*args)
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            path.with_suffix(".pid").unlink(missing_ok=True)
