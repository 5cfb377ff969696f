"""Large CPU outputs of the mix on transparent huge pages (core/_pages.py).

The advice changes the page size only: the values must be bitwise those of the 4 KiB pages,
the advice must cover exactly the whole 2 MiB pages inside the tensor, only for large CPU
tensors, and ``CMDA_HUGE_PAGES=0`` must turn it off.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import pytest
import torch

from cmda_data.core import _pages
from cmda_data.core import functional as F

HUGE = 2 << 20


def _vm_flags(address: int) -> list:
    """The VmFlags of the mapping of this process that holds ``address`` (Linux smaps)."""
    flags, inside = None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            flags = line.split()[1:]
    assert flags is not None, "no mapping holds the address"
    return flags


LINUX_MADVISE = sys.platform.startswith("linux") and getattr(mmap, "MADV_HUGEPAGE", None) is not None
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# only platform grounds skip: a broken madvise loader must fail test_madvise_is_found, not skip these
linux_thp = pytest.mark.skipif(
    not LINUX_MADVISE or not THP.exists() or not Path("/proc/self/smaps").exists()
    or "VmFlags:" not in Path("/proc/self/smaps").read_text()
    or os.environ.get("THP_MEM_ALLOC_ENABLE", "0") not in ("", "0"),  # torch would advise every tensor
    reason="needs Linux with transparent huge pages, smaps VmFlags, and THP_MEM_ALLOC_ENABLE unset")


@pytest.mark.skipif(not LINUX_MADVISE, reason="madvise(MADV_HUGEPAGE) is Linux only")
def test_madvise_is_found():
    assert _pages._MADVISE is not None
    assert _pages._HUGE >= 2 << 20 and _pages._HUGE & (_pages._HUGE - 1) == 0


@linux_thp
def test_a_large_output_is_advised_and_a_plain_tensor_is_not(monkeypatch):
    monkeypatch.delenv("CMDA_HUGE_PAGES", raising=False)
    out = _pages.empty_output((64, 3 * 224 * 224), dtype=torch.float32, device=torch.device("cpu"))
    middle = out.data_ptr() + out.numel() * out.element_size() // 2
    assert "hg" in _vm_flags(middle)
    plain = torch.empty(64, 3 * 224 * 224)
    assert "hg" not in _vm_flags(plain.data_ptr() + plain.numel() * 2)


@linux_thp
@pytest.mark.parametrize("setting", ["0", "off", "False"])
def test_the_environment_variable_turns_it_off(monkeypatch, setting):
    monkeypatch.setenv("CMDA_HUGE_PAGES", setting)
    out = _pages.empty_output((64, 3 * 224 * 224), dtype=torch.float32, device=torch.device("cpu"))
    assert "hg" not in _vm_flags(out.data_ptr() + out.numel() * 2)


def test_the_advice_covers_the_whole_huge_pages_inside_the_tensor_only(monkeypatch):
    calls = []
    monkeypatch.setattr(_pages, "_MADVISE", lambda start, length, advice: calls.append((start, length)) or 0)
    monkeypatch.setattr(_pages, "_ADVICE", 14)
    monkeypatch.delenv("CMDA_HUGE_PAGES", raising=False)
    for shape, dtype in [((5, 7_000_001), torch.float32), ((3, 6_000_000), torch.float64), ((40 << 20,), torch.uint8)]:
        calls.clear()
        t = _pages.empty_output(shape, dtype=dtype, device=torch.device("cpu"))
        begin, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        (start, length), = calls
        assert start % HUGE == 0 and length % HUGE == 0 and length > 0
        assert begin <= start < begin + HUGE and end - HUGE < start + length <= end
    calls.clear()
    _pages.empty_output((1, (32 << 20) // 4 - 1), dtype=torch.float32, device=torch.device("cpu"))  # below 32 MiB
    _pages.advise_huge(torch.empty(0))
    assert calls == []


@pytest.mark.parametrize("sparse", [False, True])
def test_the_mix_gives_the_same_bits_on_either_page_size(monkeypatch, sparse):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 224, 224, generator=g)  # 38.5 MB: above the threshold
    weights = torch.softmax(torch.randn(64, 64, generator=g), 1)
    index, values = F.topk_sparse(weights, 8) if sparse else (None, weights)
    monkeypatch.setenv("CMDA_HUGE_PAGES", "0")
    small = F.mix(values, x, index=index)
    monkeypatch.setenv("CMDA_HUGE_PAGES", "1")
    huge = F.mix(values, x, index=index)
    assert torch.equal(small, huge)
    if not sparse:  # the product itself, as plain torch computes it
        assert torch.equal(huge, torch.mm(weights, x.reshape(64, -1)).view_as(x))
    expected = torch.einsum("nm,m...->n...", torch.zeros(64, 64).scatter_(1, index, values) if sparse else weights, x)
    torch.testing.assert_close(huge, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_large_dense_mix_in_column_blocks_is_one_product(monkeypatch, threads):
    """Above the threshold the dense mix runs one L2-sized block of columns at a time, shared out to
    single-threaded threads: the same bits as one torch.mm, at any thread count."""
    from cmda_data.core import _kernels

    if not torch.backends.mkl.is_available():
        pytest.skip("the blocked dense route is taken with MKL only")
    pieces, split = [], _kernels.run_split
    monkeypatch.setattr(_kernels, "run_split", lambda work, n, t: pieces.append((n, t)) or split(work, n, t))
    monkeypatch.setattr(_kernels, "wants_huge_pages", lambda nbytes, device: True)  # (as for a large output)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(48, 3, 100, 101, generator=g)  # 30,300 columns, not a multiple of the block
    weights = torch.softmax(torch.randn(40, 48, generator=g), 1)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = F.mix(weights, x)
        expected = torch.mm(weights, x.reshape(48, -1)).view(40, 3, 100, 101)
    finally:
        torch.set_num_threads(saved)
    assert pieces and pieces[0][0] > 1 and pieces[0][1] == threads  # the blocked route ran, on the pool
    assert torch.equal(out, expected)


def _batch(rows: int = 64):
    g = torch.Generator().manual_seed(1)
    return torch.rand(rows, 3, 224, 224, generator=g), torch.softmax(torch.randn(rows, rows, generator=g), 1)


@pytest.mark.parametrize("which", ["both", "weights", "samples"])
def test_the_dense_mix_keeps_its_gradients_above_the_threshold(which):
    x, weights = _batch()  # 38.5 MB
    x.requires_grad_(which in ("both", "samples"))
    weights.requires_grad_(which in ("both", "weights"))
    F.mix(weights, x).sum().backward()
    if x.requires_grad:
        torch.testing.assert_close(x.grad, weights.detach().sum(0).reshape(64, 1, 1, 1).expand_as(x))
    if weights.requires_grad:
        torch.testing.assert_close(weights.grad, x.detach().reshape(64, -1).sum(1).expand(64, 64))


def test_no_grad_with_inputs_that_require_grad():
    x, weights = _batch()
    x.requires_grad_()
    with torch.no_grad():
        out = F.mix(weights, x)
    assert not out.requires_grad
    assert torch.equal(out, torch.mm(weights, x.detach().reshape(64, -1)).view_as(x))


def test_forward_mode_tangents_go_through_the_dense_mix():
    import torch.autograd.forward_ad as fwAD

    x, weights = _batch()
    tangent = torch.rand_like(x)
    with fwAD.dual_level():
        out = F.mix(weights, fwAD.make_dual(x, tangent))
        primal, out_tangent = fwAD.unpack_dual(out)
    assert torch.equal(primal, F.mix(weights, x))
    torch.testing.assert_close(out_tangent, F.mix(weights, tangent))


def test_autocast_keeps_its_dtype_with_and_without_grad():
    x, weights = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            quiet = F.mix(weights, x)
        x.requires_grad_()
        graded = F.mix(weights, x)
    assert quiet.dtype == graded.dtype == torch.bfloat16
