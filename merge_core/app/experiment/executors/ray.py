"""The ``ray`` executor: every job a Ray task holding its declared resources.

``ray: {address: auto}`` (or ``ray://host:port``) joins a running cluster (KubeRay, Ray
started inside a Slurm allocation, a cloud cluster); without an address a Ray is started on
this machine (``num_cpus``, ``num_gpus`` bound it). A job whose worker dies is retried by
Ray itself (``max_retries``, default 3); a retried fine-tune resumes from the toolkit's last
checkpoint in its work folder. A job needing more than one GPU holds them in a placement
group of one bundle (one node), where the toolkit's own DDP runs (NeMo: ``trainer.devices``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from merge_core.app.experiment.executors import run_job
from merge_core.app.experiment.graph import Node
from merge_core.errors import RecipeError


class RayExecutor:
    def __init__(self, options: Mapping[str, Any]) -> None:
        try:
            import ray
        except ImportError:
            raise RecipeError("executor: ray needs Ray: pip install -e '.[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:  # on the main thread: Ray's core worker outlives a shutdown begun from another
            local = {k: options[k] for k in ("num_cpus", "num_gpus") if options.get(k) is not None}
            ray.init(address=options.get("address"), runtime_env=options.get("runtime_env"), log_to_driver=False,
                     include_dashboard=False, **({} if options.get("address") else local))
        self.capacity = None  # Ray queues tasks until their resources are free
        self.max_retries = int(options.get("max_retries", 3))
        self.remote = ray.remote(run_job)
        self.refs: dict[Any, tuple[str, Any]] = {}  # task -> (node id, placement group or None)

    def submit(self, node: Node, fn: Callable[..., Any], args: tuple[Any, ...], log: Path) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        res = node.resources
        options: dict[str, Any] = {"num_cpus": res.cpus, "num_gpus": res.gpus, "max_retries": self.max_retries,
                                   "name": node.name}
        group = None
        if res.gpus > 1:  # the toolkit's DDP on one node: its GPUs reserved together
            group = placement_group([{"CPU": res.cpus, "GPU": res.gpus}], strategy="STRICT_PACK")
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group)
        ref = self.remote.options(**options).remote(str(log), res.cpus, fn, args)
        self.refs[ref] = (node.id, group)

    def wait(self, timeout: float) -> list[tuple[str, str | None]]:
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready:  # and whatever else ended meanwhile
            ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        ended = []
        for ref in ready:
            node_id, group = self.refs.pop(ref)
            try:
                self.ray.get(ref)
                error = None
            except Exception as e:  # the task's own error, or Ray's once its retries are spent
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            if group is not None:
                self.ray.util.remove_placement_group(group)
            ended.append((node_id, error))
        return ended

    def close(self, cancel: bool) -> None:
        if cancel:
            for ref in self.refs:
                self.ray.cancel(ref, force=True)
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
