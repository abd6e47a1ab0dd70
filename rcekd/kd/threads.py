"""Row blocks of a compiled kernel on several cores, through threads that the kernels' ``nogil`` frees.

Why not numba's own ``parallel=True``: its OpenMP layer shares torch's libgomp and resets torch's
thread count when it starts, and its workqueue layer was 2× slower here than one thread. Torch's
intra-op thread count (``OMP_NUM_THREADS`` or ``torch.set_num_threads``) is the one knob: with one
thread every kernel runs in the caller, as before.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

POOL_PREFIX = "rcekd-kernel"


@functools.cache
def _executor(workers: int) -> ThreadPoolExecutor:
    """One pool per size for the process (threads are costly to start once a batch). Torch runs on
    one thread in each (its count is per thread): a block is already one core's share."""
    return ThreadPoolExecutor(workers, thread_name_prefix=POOL_PREFIX, initializer=torch.set_num_threads, initargs=(1,))


# a forked child (a Celery prefork worker) inherits the cache but not the pool's threads
os.register_at_fork(after_in_child=_executor.cache_clear)


def kernel_threads() -> int:
    """How many threads the row-block kernels use: torch's intra-op count."""
    return max(1, torch.get_num_threads())


def block_bounds(n_rows: int, blocks: int) -> list[tuple[int, int]]:
    """``blocks`` contiguous (first, stop) row ranges covering 0..n_rows-1, as equal as can be."""
    blocks = max(1, min(blocks, n_rows))
    return [(b * n_rows // blocks, (b + 1) * n_rows // blocks) for b in range(blocks)]


def run_blocks(kernel: Callable[..., Any], args_of: Callable[[int, int], tuple[Any, ...]], n_blocks: int) -> list[Any]:
    """``[kernel(*args_of(b, n_blocks)) for b in range(n_blocks)]``, block 0 in the caller and the
    others on the pool, so one block costs nothing extra. ``kernel`` must release the GIL (numba
    ``nogil``) and blocks must not write to the same memory."""
    if n_blocks > 1 and threading.current_thread().name.startswith(POOL_PREFIX):
        n_blocks = 1  # called from a block: waiting on the pool from inside it could deadlock
    if n_blocks <= 1:
        return [kernel(*args_of(0, 1))]
    futures = [_executor(n_blocks - 1).submit(kernel, *args_of(b, n_blocks)) for b in range(1, n_blocks)]
    first = kernel(*args_of(0, n_blocks))
    return [first, *(future.result() for future in futures)]


@contextmanager
def single_torch_thread(active: bool = True) -> Iterator[None]:
    """Torch on one thread inside the block (blocks that call torch ops run one a core), then back."""
    threads = torch.get_num_threads()
    if active and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
