"""Fresh CPU outputs on transparent huge pages (private).

A mixed batch is a new tensor, and on Linux the first write to each fresh 4 KiB page
costs a page fault in which the kernel clears the page. For a 224 px batch of 128 (77 MB,
18,816 pages) that is most of the time of a copy: measured on a 2-core EPYC VM, 31 ms of
a 38 ms ``clone()``, against 7 ms for the same copy into a buffer already touched. Asking
the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``) before the first write
makes that 37 faults of 2 MiB each: the same copy into such a buffer took 8-13 ms.

Only outputs of at least ``_MIN_BYTES`` get the advice. glibc usually serves them from a
mapping of their own (its largest dynamic mmap threshold is 32 MiB on 64-bit); where the
memory comes from the heap instead (free space at its top, another allocator preloaded),
the advice stays on that range after the tensor is freed, which changes the page size of
later objects there, never a value. The values are the same either way; only the page size
changes. Set ``CMDA_HUGE_PAGES=0`` to turn it off; it is a no-op where ``madvise`` is
missing, where the kernel has transparent huge pages set to ``never``, off Linux, and while
``torch.compile`` traces. Where THP ``defrag`` is ``madvise`` (common), a fault in advised
memory may compact memory to find a free huge page: a stall on the first calls after the page
cache has filled memory (measured in docs/benchmarks.md).

Nothing here is public API.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

__all__ = ["advise_huge", "empty_output", "wants_huge_pages"]

_MIN_BYTES = 32 << 20
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)
_OFF = ("0", "false", "no", "off")


def _huge_page_bytes(default: int = 2 << 20) -> int:
    """The kernel's transparent huge page size (2 MiB on x86-64; larger on some arm64 and ppc64 kernels)."""
    try:
        return int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text().strip()) or default
    except (OSError, ValueError):
        return default


def _load_madvise() -> Optional[Callable[[int, int, int], int]]:
    """libc's ``madvise`` (Linux, where ``mmap.MADV_HUGEPAGE`` exists), else None."""
    if not sys.platform.startswith("linux") or _ADVICE is None:
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    func.restype = ctypes.c_int
    return func


_MADVISE = _load_madvise()
_HUGE = _huge_page_bytes()


def _tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", lambda: False)())


def wants_huge_pages(nbytes: int, device: torch.device) -> bool:
    """Whether a fresh output of ``nbytes`` on ``device`` gets the advice (CPU, large, enabled, not traced)."""
    return (device.type == "cpu" and nbytes >= _MIN_BYTES and _MADVISE is not None
            and os.environ.get("CMDA_HUGE_PAGES", "1").strip().lower() not in _OFF and not _tracing())


def advise_huge(tensor: torch.Tensor) -> torch.Tensor:
    """Ask for huge pages under the whole huge pages of a fresh contiguous ``tensor``'s memory; returns it.

    Only memory the tensor owns is advised: the range is rounded inwards to huge-page bounds.
    A failed ``madvise`` (``EINVAL`` where THP is not built in) changes nothing: the pages stay 4 KiB.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if not tensor.is_contiguous() or not wants_huge_pages(nbytes, tensor.device):
        return tensor
    start = -(-tensor.data_ptr() // _HUGE) * _HUGE
    end = (tensor.data_ptr() + nbytes) // _HUGE * _HUGE
    if end > start:
        _MADVISE(start, end - start, _ADVICE)
    return tensor


def empty_output(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape)``, on huge pages when on the CPU and large (see the module docstring)."""
    return advise_huge(torch.empty(tuple(shape), dtype=dtype, device=device))
