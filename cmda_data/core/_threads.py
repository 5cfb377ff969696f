"""A pool of single-threaded worker threads for CPU kernels that split their work (private).

Several Python threads, each running torch ops at ONE intra-op thread, share a kernel's
independent pieces through a shared iterator (next() on a ``range`` iterator holds the GIL,
so each piece is taken once); torch releases the GIL inside its ops. Unlike an OpenMP
parallel region per piece, no thread waits for the others until the end: a thread that
loses its core for a while just takes fewer pieces.

Nothing here is public API.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict

import torch

__all__ = ["run_split"]

#: threads -> pool, for this process; a forked child (DataLoader worker) starts afresh
_POOLS: Dict[int, ThreadPoolExecutor] = {}
_PID = os.getpid()
_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads, and the lock may have been held at the fork."""
    global _POOLS, _PID, _LOCK
    _POOLS, _PID, _LOCK = {}, os.getpid(), threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _pool(threads: int) -> ThreadPoolExecutor:
    """The pool of ``threads`` single-threaded threads (one per count: callers at different counts share none)."""
    with _LOCK:
        if _PID != os.getpid():  # forked without the hook
            _after_fork_in_child()
        pool = _POOLS.get(threads)
        if pool is None:
            saved = torch.get_num_threads()
            pool = ThreadPoolExecutor(threads, thread_name_prefix="cmda-kernel")
            started = threading.Barrier(threads)  # every worker thread runs the setting once

            def one_thread() -> None:
                torch.get_num_threads()  # (torch's lazy per-thread setup, which would undo the next line later)
                torch.set_num_threads(1)  # this thread's ops run inline (no nested parallel region)
                started.wait()

            for future in [pool.submit(one_thread) for _ in range(threads)]:
                future.result()
            # set_num_threads also sets the count that threads started later begin with: restore it
            torch.set_num_threads(saved)
            _POOLS[threads] = pool
        return pool


def run_split(work: Callable[[int], None], pieces: int, threads: int) -> None:
    """Call ``work(i)`` once for every ``i < pieces``, on ``threads`` single-threaded threads; re-raises.

    The pool threads run in the caller's autograd state (grad mode and inference mode are
    per thread in torch: an in-place write to an inference tensor outside inference mode fails).
    """
    queue = iter(range(pieces))
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def drain() -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for i in queue:
                work(i)

    pool = _pool(threads)
    for future in [pool.submit(drain) for _ in range(threads)]:
        future.result()
