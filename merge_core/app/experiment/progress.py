"""What a person watching an experiment sees: on a terminal one live view of the graph (done,
running, waiting, failed; elapsed and estimated time left; each running job's log), and
always the same events as lines in ``<storage>/experiment.log`` (and on stdout when it is
not a terminal)."""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Mapping

from merge_core.app.experiment.graph import Node

STATES = ("done", "running", "waiting", "failed", "skipped")


class Progress:
    def __init__(self, nodes: Mapping[str, Node], log: Path, logs: Path, live: bool | None = None) -> None:
        self.nodes, self.logs = nodes, logs
        self.start = time.monotonic()
        self.started: dict[str, float] = {}
        self.took: dict[str, float] = {}  # seconds of the jobs that ended in this run
        log.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(log, "a", encoding="utf-8")
        self.live = None
        if live if live is not None else sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(auto_refresh=False)
            self.live.start()

    def event(self, node: Node, state: str, detail: str = "") -> None:
        now = time.monotonic()
        if state == "running":
            self.started[node.id] = now
        elif node.id in self.started:
            self.took[node.id] = now - self.started.pop(node.id)
        took = f" in {self.took[node.id]:.1f} s" if state in ("done", "failed") and node.id in self.took else ""
        line = f"{time.strftime('%H:%M:%S')} {state:8s} {node.kind:8s} {node.name}{took}{detail}"
        if state in ("running", "failed"):
            line += f" (log {self.logs / (node.id + '.log')})"
        self.file.write(line + "\n")
        self.file.flush()
        if self.live is None:
            print(line, flush=True)

    def eta(self, states: Mapping[str, str]) -> float | None:
        """Seconds left: the jobs not yet ended, each at its kind's mean time in this run, over
        the jobs running at once."""
        mean: dict[str, list[float]] = {}
        for node_id, seconds in self.took.items():
            mean.setdefault(self.nodes[node_id].kind, []).append(seconds)
        left = [n for n, s in states.items() if s in ("waiting", "running")]
        if not left or any(self.nodes[n].kind not in mean for n in left):
            return None
        busy = max(1, sum(s == "running" for s in states.values()))
        return sum(sum(mean[k]) / len(mean[k]) for k in (self.nodes[n].kind for n in left)) / busy

    def refresh(self, states: Mapping[str, str]) -> None:
        if self.live is None:
            return
        from rich.table import Table

        counts = Counter(states.values())
        eta = self.eta(states)
        table = Table(title=f"{' · '.join(f'{counts[s]} {s}' for s in STATES if counts[s])} · "
                            f"{time.monotonic() - self.start:.0f} s elapsed"
                            + (f" · about {eta / 60:.0f} min left" if eta is not None else ""))
        for column in ("job", "kind", "running for", "log"):
            table.add_column(column)
        now = time.monotonic()
        for node_id, since in self.started.items():
            node = self.nodes[node_id]
            table.add_row(node.name, node.kind, f"{now - since:.0f} s", str(self.logs / f"{node_id}.log"))
        self.live.update(table, refresh=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
        self.file.close()
