"""Private helpers of :mod:`cmda_data.core.functional`: argument checks and mixing kernels.

Nothing here is public API; :mod:`cmda_data.core.functional` documents the behaviour.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from ..exceptions import DeviceError, ShapeError
from ._pages import empty_output, wants_huge_pages
from ._threads import run_split
from ._validation import FLOAT_DTYPES, check_finite, check_float_tensor, check_rank, check_tensor_data, describe, fail

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- checks
def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never compute weights in half)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_float(name: str, value: object) -> torch.Tensor:
    """A floating-point tensor with finite entries (one reduction; exact scan only on doubt)."""
    check_float_tensor(name, value, finite=False)
    if value.numel():
        acc = torch.float64 if value.dtype == torch.float64 else torch.float32
        if not bool(torch.isfinite(value.sum(dtype=acc))):
            check_finite(name, value)  # a finite sum can overflow: look element-wise
    return value


def _check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        fail(name_b, f"a tensor on {a.device} like {name_a}", b, DeviceError)


def _check_matrix(name: str, value: object, *, nonnegative: bool = True) -> torch.Tensor:
    """A finite, 2-D floating-point tensor (non-negative unless told otherwise)."""
    _check_float(name, value)
    check_rank(name, value, 2)
    if nonnegative and value.numel() and float(value.amin()) < 0:
        fail(name, "non-negative weights", f"minimum {float(value.min()):.4g} in {describe(value)}",
             raw=True)
    return value


def _check_latents(name: str, value: object) -> torch.Tensor:
    _check_float(name, value)
    check_rank(name, value, 2)
    return value


def _check_resp_shape(name: str, value: object) -> torch.Tensor:
    """Responsibilities' type and shape: a floating-point ``[n, M]`` tensor with ``M >= 1``."""
    check_float_tensor(name, value, finite=False)
    check_rank(name, value, 2)
    if value.shape[1] < 1:
        fail(name, "at least one mixture component (shape [n, M] with M >= 1)", value, ShapeError)
    return value


def _resp_stats(value: torch.Tensor) -> torch.Tensor:
    """``[3]`` float64 on the device: the total, the minimum and the worst row-sum error (non-empty)."""
    sums = value.to(_compute_dtype(value)).sum(1)
    return torch.stack([sums.sum().double(), value.amin().double(), (sums - 1).abs().max().double()])


def _check_resp_stats(name: str, value: torch.Tensor, total: float, low: float, worst: float) -> None:
    """Raise the worded error for the values of :func:`_resp_stats` that fail."""
    if not math.isfinite(total):
        check_finite(name, value)  # NaN / inf entries (a finite sum can overflow: look element-wise)
    if low < 0:
        fail(name, "non-negative responsibilities", f"minimum {low:.4g}", raw=True)
    tol = max(1e-3, 4 * value.shape[1] * torch.finfo(value.dtype).eps)
    if worst > tol:
        fail(name, "responsibility rows that sum to 1 (GMM posteriors, predict_proba)",
             f"a row sum off by {worst:.4g} in {describe(value)}", raw=True)


def _check_resp(name: str, value: object) -> torch.Tensor:
    """Responsibilities: finite, 2-D, non-negative rows that sum to 1 (one read-back: a GPU sync)."""
    _check_resp_shape(name, value)
    if value.numel():
        _check_resp_stats(name, value, *_resp_stats(value).tolist())
    return value


def _uniform_if_empty(scores: torch.Tensor) -> torch.Tensor:
    """Rows whose scores are all zero become all ones (a uniform row after normalising)."""
    empty = scores.sum(1, keepdim=True) <= torch.finfo(scores.dtype).tiny
    return torch.where(empty, torch.ones_like(scores), scores)


def _normalize_rows(w: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sum; all-zero rows become uniform. Safe for subnormal rows."""
    top = w.amax(1, keepdim=True)
    ok = top > 0
    w = w / torch.where(ok, top, torch.ones_like(top))  # row max is now exactly 1
    w = w / torch.where(ok, w.sum(1, keepdim=True), torch.ones_like(top))
    return torch.where(ok, w, torch.full_like(w, 1.0 / max(w.shape[1], 1)))


def _unit_rows(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows scaled to unit length; robust to huge values, zero rows stay zero."""
    z = z.to(dtype)
    scale = z.abs().amax(1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    return F.normalize(z / scale, dim=1)


# --------------------------------------------------------------------------- mixing
def _check_samples(samples: object) -> torch.Tensor:
    if not isinstance(samples, torch.Tensor):
        fail("samples", "a floating-point torch.Tensor [m, ...]", samples)
    check_tensor_data("samples", samples)
    if samples.dtype not in FLOAT_DTYPES:
        fail("samples", "floating-point samples (token ids cannot be interpolated: mix "
             "embeddings instead)" if not samples.is_complex() else
             "real floating-point samples (float16, bfloat16, float32 or float64)", samples)
    if samples.ndim < 1:
        fail("samples", "a tensor with a leading sample dimension [m, ...]", samples, ShapeError)
    return samples


def _flatten_trailing(samples: torch.Tensor) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``samples`` as a ``[m, P]`` matrix -- a view whenever the memory layout allows.

    Mixing acts on every trailing position alike, so the trailing dims may be flattened in
    memory order (e.g. channels_last images stay channels_last and are not copied).
    Returns the matrix and a function that turns a ``[n, P]`` result back into ``[n, *S]``
    with the same layout.
    """
    m, trailing = samples.shape[0], tuple(samples.shape[1:])
    size = math.prod(trailing)
    if samples.is_contiguous() or samples.ndim <= 2:
        return samples.reshape(m, size), lambda out: out.reshape(out.shape[0], *trailing)
    order = sorted(range(1, samples.ndim), key=lambda d: -samples.stride(d))
    permuted = samples.permute(0, *order)
    if not permuted.is_contiguous():
        return samples.reshape(m, size), lambda out: out.reshape(out.shape[0], *trailing)
    inverse = [0] * samples.ndim
    for position, dim in enumerate((0, *order)):
        inverse[dim] = position
    shape = tuple(permuted.shape[1:])
    return permuted.reshape(m, size), lambda out: out.reshape(out.shape[0], *shape).permute(*inverse)


def _check_index(index: object, weights: torch.Tensor, m: int, samples: torch.Tensor, *,
                 check_range: bool = True) -> torch.Tensor:
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
        fail("index", "an int64 tensor [n, k] of positions into samples", index)
    check_rank("index", index, 2)
    _check_same_device("samples", samples, "index", index)
    if index.shape[1] < 1:
        fail("index", "at least one partner per row (k >= 1)", index, ShapeError)
    if tuple(weights.shape) != tuple(index.shape):
        fail("weights", f"shape {tuple(index.shape)} to match index (sparse mixing)", weights,
             ShapeError)
    if check_range and index.numel():
        low, high = (int(v) for v in torch.aminmax(index))
        if low < 0 or high >= m:
            fail("index", f"positions in [0, {m}) (samples has {m} rows)",
                 f"positions from {low} to {high}", raw=True)
    return index


def _sum_or_zero(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` as a 1-element float64 tensor (float32 accumulation below float64)."""
    if not t.numel():
        return torch.zeros(1, dtype=torch.float64, device=t.device)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.sum(dtype=acc).to(torch.float64).reshape(1)


def _check_mix_values(weights: torch.Tensor, samples: Optional[torch.Tensor], index: Optional[torch.Tensor],
                      m: int) -> None:
    """The value checks of ``mix`` (finite weights and samples, index range) with ONE transfer.

    Each check is a reduction whose result the host must read; on a GPU every read is a
    synchronisation that costs more than the reduction itself, so the reductions are stacked
    and read together. On the CPU a read is free and stacking is pure overhead (five extra
    small ops, about as long as the reductions of a 1024-d batch): each reduction is read
    directly. A failed scan re-runs the element-wise check that words the error.
    ``samples=None`` (CPU only): the caller checks the samples itself, while mixing.
    """
    if samples is None or samples.device.type == "cpu":
        weight_sum = _cpu_sum(weights)
        sample_sum = 0.0 if samples is None else _cpu_sum(samples)
        bounds = ()
        if index is not None and index.numel():
            low_high = torch.aminmax(index)
            bounds = (int(low_high[0]), int(low_high[1]))
    else:
        parts = [_sum_or_zero(weights), _sum_or_zero(samples)]
        if index is not None and index.numel():
            parts.append(torch.stack(torch.aminmax(index)).to(torch.float64))  # exact below 2**53
        weight_sum, sample_sum, *bounds = torch.cat(parts).tolist()
    if not math.isfinite(weight_sum):
        check_finite("weights", weights)  # a finite sum can overflow: look element-wise
    if bounds:
        low, high = int(bounds[0]), int(bounds[1])
        if low < 0 or high >= m:
            fail("index", f"positions in [0, {m}) (samples has {m} rows)",
                 f"positions from {low} to {high}", raw=True)
    if not math.isfinite(sample_sum):
        check_finite("samples", samples)


def _cpu_sum(t: torch.Tensor) -> float:
    """The sum of a CPU tensor as a Python float (float32 accumulation below float64)."""
    if not t.numel():
        return 0.0
    return t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).item()


def _mix_sparse_bmm(index: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Gather the chosen partners ``[n, k, P]`` and contract them with one ``bmm``."""
    n, k = index.shape
    gathered = flat.index_select(0, index.reshape(-1)).view(n, k, flat.shape[1])
    return torch.bmm(weights.unsqueeze(1), gathered).squeeze(1)


# Column blocking of the CPU sparse path: when the ``m`` partner rows do not fit in the L2
# cache, every output row re-reads its ``k`` partners from memory (k x the traffic of a
# copy). Mixing one block of columns at a time keeps that block of all ``m`` rows in L2, so
# memory traffic approaches one read of the samples and one write of the output. A block of
# partner rows and the block of output it produces each take half of one core's L2
# (``_BLOCK_BYTES``, read from sysfs, an L2 of 1 MiB when unknown), at most 512 KiB: 512 KiB
# blocks on a 1 MiB-L2 EPYC (3x224x224, B = 128: 1.5x a clone against 2.0-2.4x unblocked).
# Wider blocks also make the per-block output of embedding_bag larger, and glibc then hands
# it out as fresh pages on every block (measured: 3x the page faults of a clone from 1 MiB
# blocks up, 2x slower), hence the cap.
# Tables below _BLOCK_MIN_BYTES are cache resident and gain nothing from blocking.
_BLOCK_MIN_BYTES = 4 << 20
_BLOCK_MIN_COLUMNS = 256
_BLOCK_MAX_BYTES = 512 << 10


def _l2_bytes(default: int = 1 << 20) -> int:
    """One core's L2 cache in bytes (Linux sysfs), or ``default`` when it cannot be read."""
    try:
        for entry in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (entry / "level").read_text().strip() == "2":
                text = (entry / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
                return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return default


_BLOCK_BYTES = max(128 << 10, min(_l2_bytes() // 2, _BLOCK_MAX_BYTES))

# With several threads the blocks go to single-threaded Python threads (_threads.run_split),
# each taking the next block when done: an OpenMP region per block made every block wait for
# its slowest thread (3.4x a clone with another process on one of 2 cores). Same bits.


def _sparse_block_columns(m: int, n: int, size: int, itemsize: int) -> int:
    """Columns per block of the blocked sparse path, or ``size`` (one block) when not worth it.

    A block of the ``m`` partner rows (and of the ``n`` output rows it produces) should fit
    in ``_BLOCK_BYTES``; blocks are whole cache lines and at least ``_BLOCK_MIN_COLUMNS`` wide.
    """
    if m * size * itemsize <= _BLOCK_MIN_BYTES:
        return size
    columns = _BLOCK_BYTES // max(max(m, n) * itemsize, 1)
    columns = max(_BLOCK_MIN_COLUMNS, columns - columns % 64)  # whole cache lines per row
    return size if columns >= size else columns


def _embedding_bag_sum(index: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[i] = sum_t weights[i, t] * table[index[i, t]]`` (flattened bags; fixed-size bags)."""
    n, k = index.shape
    offsets = torch.arange(0, n * k, k, device=index.device)
    return F.embedding_bag(index.reshape(-1), table, offsets, mode="sum",
                           per_sample_weights=weights.reshape(-1))


def _mix_sparse_blocked(index: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor, columns: int, *,
                        check: bool = False) -> Tuple[torch.Tensor, Optional[float]]:
    """:func:`_mix_sparse` one block of ``columns`` columns at a time, into one preallocated output.

    Every output element is computed by the same ``embedding_bag`` arithmetic as the unblocked
    path, so the results are bitwise identical. No autograd support (callers check). The
    argument checks of ``F.embedding_bag`` run once, on the first block, in the calling thread;
    the others call the op directly (a few microseconds each, over ~150 blocks of a 224 px
    batch), shared out to single-threaded Python threads at several threads.

    Returns ``(out, total)``. With ``check``, ``total`` is the sum of every entry of ``flat``
    (NaN or inf when an entry is, or when the sum overflows): two extra bags, each summing half
    of the ``m`` rows with weight 1, ride along in every block while the block is in cache, so
    the finiteness check of ``mix`` costs no second pass over the samples in memory (one half
    at each end, so the threads' shares of bags stay even). Otherwise ``total`` is None.
    """
    n, k = index.shape
    m, size = flat.shape
    bags, per_sample = index.reshape(-1), weights.reshape(-1)
    offsets = torch.arange(0, n * k, k, device=index.device)
    first = 0
    if check:
        half = m // 2
        rows = torch.arange(m, device=index.device)
        ones = torch.ones(m, dtype=per_sample.dtype, device=per_sample.device)
        bags = torch.cat([rows[:half], bags, rows[half:]])
        per_sample = torch.cat([ones[:half], per_sample, ones[half:]])
        offsets = torch.cat([offsets.new_zeros(1), offsets + half, offsets.new_full((1,), half + n * k)])
        first = 1
        check_rows = torch.empty((2, size), dtype=flat.dtype, device=flat.device)
    out = empty_output((n, size), dtype=flat.dtype, device=flat.device)

    def one_block(at: int) -> None:
        start = at * columns
        width = min(columns, size - start)
        table = flat.narrow(1, start, width)
        if start == 0:
            block = F.embedding_bag(bags, table, offsets, mode="sum", per_sample_weights=per_sample)
        else:
            block = torch.embedding_bag(table, bags, offsets, False, 0, False, per_sample)[0]
        out.narrow(1, start, width).copy_(block.narrow(0, first, n))
        if check:
            check_rows.narrow(1, start, width).copy_(block[0::n + 1])

    one_block(0)  # (the argument checks of F.embedding_bag, here)
    blocks, threads = -(-size // columns), torch.get_num_threads()
    if threads > 1:  # the other blocks spread over single-threaded Python threads (see _threads)
        run_split(lambda at: one_block(at + 1), blocks - 1, threads)
    else:
        for at in range(1, blocks):
            one_block(at)
    if not check:
        return out, None
    return out, check_rows.sum(dtype=torch.float64 if flat.dtype == torch.float64 else torch.float32).item()


def _mix_sparse_cpu(index: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor, *,
                    check: bool = False) -> Tuple[torch.Tensor, Optional[float]]:
    """The CPU ``embedding_bag`` route: column blocks when worth it (see ``_BLOCK_BYTES``),
    shared out to the threads (see :func:`_threads.run_split`).

    Returns ``(out, total)``: ``total`` is the sum of ``flat`` when ``check`` asked for it and
    the blocked path computed it on the way (see :func:`_mix_sparse_blocked`), else None.
    """
    if flat.stride(1) != 1 or (torch.is_grad_enabled() and (flat.requires_grad or weights.requires_grad)):
        return _embedding_bag_sum(index, weights, flat), None
    columns = _sparse_block_columns(flat.shape[0], index.shape[0], flat.shape[1], flat.element_size())
    if columns >= flat.shape[1]:
        return _embedding_bag_sum(index, weights, flat), None
    return _mix_sparse_blocked(index, weights, flat, columns, check=check)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)`` (torch < 2.4: the per-device functions)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _mix_dense(weights: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``weights [n, m] @ flat [m, P]`` in the dtype of ``flat``, half/bfloat16 summed in float32."""
    if flat.dtype in _LOW_PRECISION and flat.device.type != "cpu":
        # CPU kernels accumulate half/bfloat16 products in float32; elsewhere make sure
        return torch.mm(weights.float(), flat.float()).to(flat.dtype)
    weights = weights.to(flat.dtype)
    if not _plain_product(weights, flat):
        return torch.mm(weights, flat)
    out = empty_output((weights.shape[0], flat.shape[1]), dtype=flat.dtype, device=flat.device)
    columns = _sparse_block_columns(flat.shape[0], weights.shape[0], flat.shape[1], flat.element_size())
    if flat.dtype not in (torch.float32, torch.float64) or not torch.backends.mkl.is_available() or \
            flat.stride(1) != 1 or columns >= flat.shape[1]:
        return torch.mm(weights, flat, out=out)

    # L2-sized column blocks shared out like the sparse ones (MKL's thread count is per thread), each
    # column the same bits as in one mm: 3x224x224, B = 128 mixes 6% faster at 1 thread, 15% at 2
    def one_block(at: int) -> None:
        start = at * columns
        width = min(columns, flat.shape[1] - start)
        torch.mm(weights, flat.narrow(1, start, width), out=out.narrow(1, start, width))

    run_split(one_block, -(-flat.shape[1] // columns), torch.get_num_threads())
    return out


def _plain_product(weights: torch.Tensor, flat: torch.Tensor) -> bool:
    """Whether ``weights @ flat`` may write into a huge-page buffer (``mm(out=)``): a large CPU output
    (see :mod:`._pages`) that records no gradient (``out=`` supports neither autograd nor forward-mode
    tangents) and is not under autocast (``out=`` keeps the buffer's dtype)."""
    if not wants_huge_pages(weights.shape[0] * flat.shape[1] * flat.element_size(), flat.device):
        return False
    if torch.is_grad_enabled() and (flat.requires_grad or weights.requires_grad):
        return False
    if autocast_enabled("cpu"):
        return False
    return all(forward_ad.unpack_dual(t).tangent is None for t in (weights, flat))


# On CUDA, embedding_bag gathers each output row's k partner rows with scattered loads, while
# a dense [n, m] @ [m, P] product runs as one cuBLAS GEMM. In one H200 run (B = m = 128,
# k = 8, float32; benchmarks/results/bench_mixing-cuda.json, both kernels without argument
# checks) the GEMM took 0.23 ms at 3x224x224 against 0.64 ms for embedding_bag, and both were
# launch-bound (0.06 ms) at 1024-d. So while the dense product does at most
# _DENSE_ROUTE_RATIO times the sparse path's multiply-adds (m <= ratio * k), CUDA mixes the
# top-k weights scattered into a dense matrix. Measured at m / k = 16 only.
_DENSE_ROUTE_RATIO = 16


def _sparse_route(device_type: str, m: int, k: int) -> str:
    """How :func:`_mix_sparse` mixes ``k`` partners of ``m`` rows on ``device_type``."""
    if device_type == "cuda" and m <= _DENSE_ROUTE_RATIO * k:
        return "dense"
    return "embedding_bag" if device_type in ("cpu", "cuda") else "bmm"


def _densify(index: torch.Tensor, weights: torch.Tensor, m: int) -> torch.Tensor:
    """The ``[n, m]`` matrix of sparse weights (repeated positions add up, as in the sparse sum)."""
    return weights.new_zeros((index.shape[0], m)).scatter_add(1, index, weights)


def _mix_sparse(index: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``out[i] = sum_t weights[i, t] * flat[index[i, t]]`` without the dense ``[n, m]``.

    ``embedding_bag(mode="sum", per_sample_weights=...)`` computes exactly this weighted sum
    of gathered rows without materialising the ``[n, k, P]`` gather (6x faster than gather +
    bmm on CPU, accumulating half/bfloat16 in float32); other backends use gather + bmm.
    On the CPU, large inputs without autograd are mixed in L2-sized column blocks
    (:func:`_mix_sparse_blocked`, same results; at several threads the blocks are shared out
    to single-threaded Python threads, see :func:`_threads.run_split`). On CUDA, a batch that is small
    against ``k`` (``m <= 16 k``) is mixed as one dense product (:func:`_sparse_route`).
    """
    route = _sparse_route(flat.device.type, flat.shape[0], index.shape[1])
    if route == "dense":
        return _mix_dense(_densify(index.long(), weights, flat.shape[0]), flat)
    if route == "embedding_bag":
        index = index.long()
        if flat.device.type == "cpu":
            return _mix_sparse_cpu(index, weights, flat)[0]
        return _embedding_bag_sum(index, weights, flat)
    work = torch.float32 if flat.dtype in _LOW_PRECISION else flat.dtype
    return _mix_sparse_bmm(index.long(), weights.to(work), flat.to(work)).to(flat.dtype)


# --------------------------------------------------------------------------- labels
def _targets_as_probabilities(targets: object, num_classes: Optional[int],
                              label_smoothing: float) -> torch.Tensor:
    """``[m, C]`` float32 rows that sum to 1 (one-hot, multi-hot or probabilities)."""
    if not isinstance(targets, torch.Tensor):
        fail("targets", "class indices [m] or a [m, C] tensor of one-hot / multi-hot / "
             "probability rows", targets)
    check_tensor_data("targets", targets)
    if targets.ndim == 1:
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            fail("targets", "integer class indices for a 1-D tensor (float targets must be [m, C])",
                 targets)
        if num_classes is None:
            fail("num_classes", "the number of classes when targets are class indices", None)
        if targets.numel():
            low, high = torch.stack(torch.aminmax(targets)).tolist()  # one read-back (a GPU sync)
            if low < 0 or high >= num_classes:
                fail("targets", f"class indices in [0, {num_classes})",
                     f"values from {low} to {high}", raw=True)
        # F.one_hot(targets, num_classes).float(), without its second range check
        try:
            probs = torch.zeros(targets.shape[0], num_classes, dtype=torch.float32, device=targets.device)
        except (RuntimeError, TypeError, OverflowError) as error:  # too large to allocate
            fail("num_classes", f"a number of classes that fits a [{targets.shape[0]}, num_classes] float32 tensor",
                 f"{num_classes} ({type(error).__name__}: {str(error).splitlines()[0][:80]})", raw=True)
        probs.scatter_(1, targets.long()[:, None], 1.0)
    elif targets.ndim == 2:
        if targets.is_complex():
            fail("targets", "a real [m, C] tensor", targets)
        probs = targets.float() if targets.dtype != torch.float64 else targets
        check_finite("targets", probs)
        if probs.numel() and bool((probs < 0).any()):
            fail("targets", "non-negative one-hot / multi-hot / probability rows",
                 f"minimum {float(probs.min()):.4g}", raw=True)
        if num_classes is not None and num_classes != probs.shape[1]:
            fail("targets", f"{num_classes} columns to match num_classes", targets, ShapeError)
        sums = probs.sum(1, keepdim=True)
        if probs.numel() and bool((sums <= 0).any()):
            fail("targets", "every row to have a positive sum (at least one class)",
                 f"{int((sums <= 0).sum())} all-zero rows", raw=True)
        # a row sum can overflow (entries near 3e38): such rows are scaled by their max first
        probs = torch.where(torch.isfinite(sums), probs / sums, _normalize_rows(probs)).float()
    else:
        fail("targets", "class indices [m] or a [m, C] matrix", targets, ShapeError)
    if label_smoothing:
        probs = probs * (1.0 - label_smoothing) + label_smoothing / probs.shape[1]
    return probs
