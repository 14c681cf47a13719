"""Numpy passes over tensors, on threads.

The merge's element-wise passes over float32/float64 CPU tensors run in numpy where
they must be fast: numpy compares and selects several times faster than torch on CPU,
and it releases the GIL, so plain threads run passes side by side. torch's own
(OpenMP) threads are no help there: after each parallel op they spin for milliseconds,
taking a core from any other thread, so the streaming merge keeps torch ops off the
path of the threaded ones.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

_T = TypeVar("_T")
_R = TypeVar("_R")
# dtypes whose passes run in numpy (sharing the tensor's memory)
_NUMPY_DTYPES = (torch.float32, torch.float64)
# from this many entries per tensor on, passes are worth spreading over threads
THREADS_FROM = 1 << 16


def numpy_ready(t: torch.Tensor) -> bool:
    """Whether ``t``'s passes can run in numpy on its own memory (a float32/float64 CPU tensor)."""
    return t.dtype in _NUMPY_DTYPES and t.device.type == "cpu" and not t.requires_grad


def in_threads(fn: Callable[[_T], _R], items: Iterable[_T], parallel: bool) -> list[_R]:
    """``[fn(item) for item in items]``, on up to ``torch.get_num_threads()`` threads when
    ``parallel``; results in the items' order, and the first item's exception (in that
    order) raised, as the plain loop would."""
    workers = torch.get_num_threads()
    if not parallel or workers < 2:
        return [fn(item) for item in items]
    return list(_thread_pool(os.getpid(), workers).map(fn, items))


@functools.lru_cache(maxsize=4)
def _thread_pool(pid: int, workers: int) -> ThreadPoolExecutor:
    # keyed by process id: a forked child cannot use its parent's threads
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="asr-merge")
