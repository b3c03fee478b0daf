"""Fan planning work out over CPU threads.

numpy releases the GIL inside BLAS calls, ufunc loops and pocketfft, so independent (layer, head)
blocks run truly in parallel on threads. BLAS is pinned to one thread per worker meanwhile: two
workers each running a single-threaded GEMM and then their single-threaded numpy passes
(exp, max, sums) kept both cores busy, where one worker with a 2-thread GEMM left one core idle
during every elementwise pass (window attention: 0.63 s vs 0.82 s, 7B shape, 2 cores). Loops of small
sorts stay on the calling thread: fanned out, their GIL hand-offs made them slower, not faster.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

from edgekv.errors import EdgeKVError

J = TypeVar("J")
R = TypeVar("R")


_threads: ContextVar[int | None] = ContextVar("edgekv_planning_threads", default=None)


def threads() -> int:
    """Worker threads for planning: $EDGEKV_THREADS, else `planning_threads`, else every CPU."""
    env = os.environ.get("EDGEKV_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise EdgeKVError(f"EDGEKV_THREADS must be a positive integer, got {env!r}")
        return int(env)
    return max(1, _threads.get() or os.cpu_count() or 1)


@contextmanager
def planning_threads(n: int | None) -> Iterator[None]:
    """Plan with n threads inside the block (the session passes the model's --threads)."""
    token = _threads.set(n)
    try:
        yield
    finally:
        _threads.reset(token)


_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child: none of the parent's threads exist, nor its planners' BLAS limit."""
    global _pool, _pool_lock, _blas_lock, _blas_users, _blas_limiter
    _pool, _pool_lock = None, threading.Lock()
    _blas_lock, _blas_users, _blas_limiter = threading.Lock(), 0, None


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_forget_pool)


def _executor(n: int) -> ThreadPoolExecutor:
    """One long-lived pool, so its threads' scratch buffers (`_scratch`) outlive a single call."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(n, thread_name_prefix="edgekv-plan")
        return _pool


def _scratch(shape: tuple[int, ...]) -> np.ndarray:
    """This thread's float32 scratch buffer of `shape`, kept for the next call of the same shape."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape != shape:
        buf = _local.buf = np.zeros(shape, dtype=np.float32)
    return buf


def parallel_map(fn: Callable[[J, np.ndarray | None], R], jobs: Sequence[J],
                 scratch: tuple[int, ...] | None = None) -> list[R]:
    """[fn(job, buf) for job in jobs] on up to threads() workers; `buf` is a float32 scratch array of
    shape `scratch`, one per worker thread, or None. fn must not share `buf` beyond its call."""
    n = min(threads(), len(jobs))

    def run(job: J) -> R:
        return fn(job, None if scratch is None else _scratch(scratch))

    def worker(job: J) -> R:
        _local.in_pool = True
        return run(job)

    # Inside a worker, nested calls run inline: waiting on the pool from its own threads deadlocks.
    if n <= 1 or getattr(_local, "in_pool", False):
        return [run(job) for job in jobs]
    with _one_blas_thread():
        return list(_executor(threads()).map(worker, jobs))


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS at one thread while any caller plans. Reference-counted: with two sessions planning at once,
    nested threadpool_limits would restore in the wrong order and leave BLAS at one thread for good."""
    global _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = threadpool_limits(1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None
