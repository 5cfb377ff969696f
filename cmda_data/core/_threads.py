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
from typing import Callable, Optional, Tuple

import torch

__all__ = ["run_split"]

#: (process id, threads, pool): a forked child (DataLoader worker) starts its own pool
_POOL: Optional[Tuple[int, int, ThreadPoolExecutor]] = None
_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads, and the lock may have been held at the fork."""
    global _POOL, _LOCK
    _POOL, _LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] != threads:
            if _POOL is not None and _POOL[0] == os.getpid():
                _POOL[2].shutdown(wait=False)
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
            _POOL = (os.getpid(), threads, pool)
        return _POOL[2]


def run_split(work: Callable[[int], None], pieces: int, threads: int) -> None:
    """Call ``work(i)`` once for every ``i < pieces``, on ``threads`` single-threaded threads; re-raises."""
    queue = iter(range(pieces))

    def drain() -> None:
        for i in queue:
            work(i)

    for future in [_pool(threads).submit(drain) for _ in range(threads)]:
        future.result()
