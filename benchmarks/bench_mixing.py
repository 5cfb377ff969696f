"""Speed of CMDA mixing against the official code's loop, torchvision MixUp and a clone.

Batch B = 128 student samples of three kinds (1024-d vectors, 3x32x32 and 3x224x224
images), on the CPU (and CUDA when available, timed with ``torch.cuda.synchronize``), at
one thread and at torch's default thread count (what a training loop uses); every method
of one table runs with the same thread count.

Peers (timed *interleaved*: one call of each per round, so machine noise hits all alike):

* ``clone``   -- ``X.clone()``: allocate a fresh batch and copy into it. **The top-k target
  compares with this**: ``mix`` also returns a freshly allocated batch, so both pay for the
  new output pages (on Linux the first touch of fresh pages costs as much as the copy).
* ``dense``   -- ``functional.mix(W, X)``: one matmul over the flattened samples (weights
  precomputed; ``dense+w`` also times Eq. 10 + Alg. 1 weights from 128-d latents).
* ``topk``    -- ``functional.mix(values, X, index=index)`` with 8 partners per row (sparse
  path; ``topk+w`` also times the weights and ``topk_sparse``).
* ``mixup``   -- ``torchvision.transforms.v2.MixUp(num_classes=10)`` on the same batch with
  integer labels (vectors are viewed as ``[B, 1, 1, 1024]`` images, which it requires).
* ``clone_huge`` -- the same copy into a fresh buffer that asks for transparent huge pages
  (``core/_pages.py``), as ``mix`` does for its own output when it is large (>= 32 MiB, CPU):
  ``topk/clone_huge`` is the ratio of the two at the same page size (reported, not a target).
* floors, not targets: ``clone_out`` copies into a preallocated buffer and ``dense_out``
  is ``torch.mm(..., out=)`` into one (no fresh pages); ``topk_1bag`` is the sparse
  kernel without column blocking (one ``embedding_bag`` over the whole rows). On CUDA the
  ``topk`` path itself mixes B = 128, k = 8 as one dense product (``_sparse_route``), so
  there ``topk_1bag`` is the kernel that route replaced. ``dense_bf16`` / ``clone_bf16``:
  the unchecked dense kernel and the clone on a bfloat16 copy of the batch.

Timed apart (slow, few calls): ``loop`` -- a faithful re-creation of the official code
(official-code-notes.md §1.1, §6: per row ``g = zeros_like(x[0])``; ``g += W[i, j] * X[j]``;
``torch.stack``), ``dense_f64`` and ``topk_bmm`` (gather + ``bmm``).

Every call records wall time and the process CPU time. On a shared machine other tenants
steal wall time from long calls more than from short ones; at one thread CPU time (user +
system, so page faults count) is the contention-free cross-check and is reported next to
the wall-clock verdict. Medians over the rounds; ``--repeats`` rounds after 2 warmup rounds.

The run also measures the machine: single-thread sgemm GFLOP/s (cache-resident
128x128 @ 128x3072) and copy bandwidth (256 MiB, preallocated and fresh output), so the
ratios can be read against physical limits. CPU rows get ``matmul_floor/clone``: the dense
mix's flops at that sgemm peak (times the threads) against the clone -- the best ratio any
float32 dense mix could reach here.

Targets (issue 13, ``TARGETS``; wall-clock ratios of one run, each printed with its measured
ratio and PASS / FAIL and kept in the ``targets`` block of the JSON): top-k(8) <= 1.3x clone
at 224 px with 2 threads; top-k <= dense and dense (``mix``, checks included) <= 1.2x
``dense_kernel`` (the plain matmul into a fresh buffer) at every size, on the CPU and on CUDA;
guards: >= 15x the official loop and <= 1.0x torchvision ``MixUp`` at 224 px (CPU). Targets
without a row in a run (the CUDA ones on a CPU-only machine) are reported as n/a.
``sparse_path`` in each row counts how many ``topk`` calls ran column-blocked (at several
threads the blocks are shared out to single-threaded Python threads, each taking the next
block when done: a thread that loses its core takes fewer; ``--busy`` measures that case).

Usage::

    python benchmarks/bench_mixing.py                 # 1 thread and the default threads
    python benchmarks/bench_mixing.py --quick         # fewer rounds; loop at 224 extrapolated
    python benchmarks/bench_mixing.py --threads 2     # one table at 2 threads
    python benchmarks/bench_mixing.py --busy 1        # the noisy case: one process spinning on a core

Writes ``benchmarks/results/bench_mixing.json`` (``bench_mixing-busyN.json`` with ``--busy N``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmda_data.core import _kernels as Kn  # noqa: E402
from cmda_data.core import functional as Fn  # noqa: E402
from cmda_data.core._pages import empty_output  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is in the bench extra
    tqdm = None

B = 128
K = 8
LATENT = 128
CASES = {"vec1024": (1024,), "img32": (3, 32, 32), "img224": (3, 224, 224)}
TARGETS = {  # issue 13 ("Issue 2's speed targets, restated"); a ratio of wall-clock medians, same run
    # name: (comparison, bound, text, devices, cases (None: every size), threads (None: every count))
    "topk/clone": ("<=", 1.3, "top-k(8) <= 1.3x clone at 224 px, 2 threads", ("cpu",), ("img224",), (2,)),
    "topk/dense": ("<=", 1.0, "top-k(8) <= dense at every size", ("cpu", "cuda"), None, None),
    "dense/dense_kernel": ("<=", 1.2, "dense <= 1.2x dense_kernel (checks' overhead)", ("cpu", "cuda"), None, None),
    "loop/dense": (">=", 15.0, "guard: dense >= 15x the official loop", ("cpu",), None, None),
    "loop/topk": (">=", 15.0, "guard: top-k >= 15x the official loop", ("cpu",), None, None),
    "dense/mixup": ("<=", 1.0, "guard: dense <= 1.0x torchvision MixUp at 224 px", ("cpu",), ("img224",), None),
    "topk/mixup": ("<=", 1.0, "guard: top-k <= 1.0x torchvision MixUp at 224 px", ("cpu",), ("img224",), None),
}


def applies(key: str, device: str, case: str, threads: int) -> bool:
    """Whether target ``key`` is judged on a row (device type, case, thread count)."""
    _, _, _, devices, cases, counts = TARGETS[key]
    return (device in devices and (cases is None or case in cases)
            and (counts is None or device != "cpu" or threads in counts))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(wall: List[float], cpu: List[float]) -> Dict[str, float]:
    ms, cms = [t * 1e3 for t in wall], [t * 1e3 for t in cpu]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "cpu_median_ms": statistics.median(cms), "n": len(ms)}


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, *, rounds: int,
                     warmup: int = 2, budget_s: float = 2.0) -> Dict[str, Dict[str, float]]:
    """Median wall / CPU time (ms) of each function, one call of each per round.

    Interleaving puts every peer under the same machine load. Stops after ``rounds`` rounds,
    or earlier (at least 5 rounds) once ``budget_s`` is spent.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    spent, done = 0.0, 0
    while done < rounds and (done < 5 or spent < budget_s):
        for key, fn in fns.items():
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync(device)
            elapsed = time.perf_counter() - t0
            cpu[key].append(time.process_time() - c0)
            wall[key].append(elapsed)
            spent += elapsed
        done += 1
    return {k: _summary(wall[k], cpu[k]) for k in fns}


def time_alone(fn: Callable[[], object], device: torch.device, *, repeats: int,
               budget_s: float = 1.0) -> Dict[str, float]:
    """Median of ``repeats`` calls after one warmup call (at least 2 timed calls)."""
    fn()
    sync(device)
    wall: List[float] = []
    cpu: List[float] = []
    while len(wall) < repeats and (len(wall) < 2 or sum(wall) < budget_s):
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return _summary(wall, cpu)


def official_loop(W: torch.Tensor, X: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
    """The official code's generation: one zero buffer per row, B scalar x sample adds."""
    generated = []
    for i in range(W.shape[0] if rows is None else rows):
        g = torch.zeros_like(X[0])
        for j in range(W.shape[1]):
            g += W[i, j] * X[j]
        generated.append(g)
    return torch.stack(generated)


def _topk_one_bag(index: torch.Tensor, values: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The sparse path without column blocking: one embedding_bag over whole rows."""
    return Kn._embedding_bag_sum(index, values, flat)


def bench_case(name: str, shape, device: torch.device, args, progress) -> Dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(B, *shape, generator=gen).to(device)
    labels = torch.randint(0, 10, (B,), generator=gen).to(device)
    teacher = torch.randn(B, LATENT, generator=gen).to(device)
    student = torch.randn(B, LATENT, generator=gen).to(device)
    resp = torch.softmax(torch.randn(B, 2, generator=gen), 1).to(device)

    def weights() -> torch.Tensor:
        return Fn.dca_weights(Fn.inter_modal_weights(teacher, student), Fn.intra_modal_weights(resp))

    W = weights()
    index, values = Fn.topk_sparse(W, K)
    flat = X.reshape(B, -1)
    out_buf = torch.empty_like(flat)
    clone_buf = torch.empty_like(X)
    X64, W64 = X.double(), W.double()

    from torchvision.transforms import v2

    mixup = v2.MixUp(num_classes=10)
    X_img = X if X.ndim == 4 else X.reshape(B, 1, 1, -1)

    # correctness first: every method computes the same thing
    reference = Fn.mix(W, X)
    loop_rows = 4 if device.type == "cpu" else 2
    torch.testing.assert_close(official_loop(W, X, loop_rows), reference[:loop_rows], rtol=1e-4, atol=1e-5)
    dense_topk = torch.zeros_like(W).scatter_(1, index, values)
    topk = Fn.mix(values, X, index=index)
    torch.testing.assert_close(topk, Fn.mix(dense_topk, X), rtol=1e-4, atol=1e-5)
    if Kn._sparse_route(device.type, B, K) == "embedding_bag":
        assert torch.equal(topk.reshape(B, -1), _topk_one_bag(index, values, flat)), "blocking changed results"
    else:  # CUDA mixes top-k weights of a small batch as one dense product: same sums, other order
        torch.testing.assert_close(topk.reshape(B, -1), _topk_one_bag(index, values, flat), rtol=1e-4, atol=1e-5)

    budget = 0.5 if args.quick else 6.0
    counter = {"calls": 0, "blocked": 0, "inside": False}

    def topk_counted() -> torch.Tensor:
        counter["calls"] += 1
        counter["inside"] = True
        try:
            return Fn.mix(values, X, index=index)
        finally:
            counter["inside"] = False

    jobs = {
        "clone": lambda: X.clone(),
        "dense": lambda: Fn.mix(W, X),
        "topk": topk_counted,
        "clone_huge": lambda: empty_output(X.shape, dtype=X.dtype, device=X.device).copy_(X),
        "clone_out": lambda: clone_buf.copy_(X),
        "dense_out": lambda: torch.mm(W, flat, out=out_buf),
        "topk_1bag": lambda: _topk_one_bag(index, values, flat),
        "mixup": lambda: mixup(X_img, labels),
        "dense+w": lambda: Fn.mix(weights(), X),
        "topk+w": lambda: _topk_with_weights(weights, X),
        # the same math without the argument checks (the entry points check once, upstream):
        # on a GPU the checks' reductions and host syncs are most of a sub-millisecond call
        "dense_kernel": lambda: Fn._mix(W, X),
        "topk_kernel": lambda: Fn._mix(values, X, index=index),
    }
    if device.type == "cuda":  # float32 matmul on the tensor cores (TF32), what many training loops enable
        jobs["dense_tf32"] = lambda: _tf32(lambda: Fn._mix(W, X))
    # bfloat16 batches (half the bytes; AMX / tensor-core matmuls), against a bfloat16 clone
    X_bf16, W_bf16 = X.bfloat16(), W.bfloat16()
    jobs["clone_bf16"] = lambda: X_bf16.clone()
    jobs["dense_bf16"] = lambda: Fn._mix(W_bf16, X_bf16)
    blocked = Kn._mix_sparse_blocked

    def blocked_counted(*a: object, **kw: object) -> object:
        counter["blocked"] += counter["inside"]
        return blocked(*a, **kw)

    Kn._mix_sparse_blocked = blocked_counted  # counts the blocked calls of `topk` only
    try:
        timings = time_interleaved(jobs, device, rounds=args.repeats, budget_s=budget)
    finally:
        Kn._mix_sparse_blocked = blocked
    progress(f"{device.type}/{name}/interleaved")
    slow = max(3, args.repeats // 4)
    timings["dense_f64"] = time_alone(lambda: Fn.mix(W64, X64), device, repeats=slow, budget_s=budget)
    timings["topk_bmm"] = time_alone(lambda: Fn._mix_sparse_bmm(index, values, flat), device,
                                     repeats=slow, budget_s=budget)
    progress(f"{device.type}/{name}/slow")

    # the loop: full, or a few rows extrapolated linearly when --quick and it is slow
    rows = 8 if args.quick and name == "img224" else B
    t = time_alone(lambda: official_loop(W, X, rows), device, repeats=3 if not args.quick else 2,
                   budget_s=budget)
    if rows != B:
        t = {k: (v * B / rows if k.endswith("_ms") else v) for k, v in t.items()}
        t["extrapolated_from_rows"] = rows
    timings["loop"] = t
    progress(f"{device.type}/{name}/loop")

    med = {k: v["median_ms"] for k, v in timings.items()}
    cpu = {k: v["cpu_median_ms"] for k, v in timings.items()}
    pairs = {"loop/dense": ("loop", "dense"), "loop/topk": ("loop", "topk"),
             "dense/clone": ("dense", "clone"), "topk/clone": ("topk", "clone"),
             "topk/dense": ("topk", "dense"), "dense/dense_kernel": ("dense", "dense_kernel"),
             "topk/topk_kernel": ("topk", "topk_kernel"),
             "dense/mixup": ("dense", "mixup"), "topk/mixup": ("topk", "mixup"),
             "mixup/clone": ("mixup", "clone"),
             # the same output pages on both sides (huge pages where mix asks for them)
             "topk/clone_huge": ("topk", "clone_huge"), "clone_huge/clone": ("clone_huge", "clone"),
             # floors: both sides writing into preallocated buffers / blocking off
             "dense_out/clone_out": ("dense_out", "clone_out"),
             "topk_1bag/topk": ("topk_1bag", "topk"), "topk_bmm/topk": ("topk_bmm", "topk"),
             # the kernels alone (no argument checks), against the same clone
             "dense_kernel/clone": ("dense_kernel", "clone"), "topk_kernel/clone": ("topk_kernel", "clone")}
    if "dense_tf32" in timings:
        pairs["dense_tf32/clone"] = ("dense_tf32", "clone")
    pairs["dense_bf16/clone_bf16"] = ("dense_bf16", "clone_bf16")
    ratios = {k: med[a] / med[b] for k, (a, b) in pairs.items()}
    cpu_ratios = {k: cpu[a] / cpu[b] for k, (a, b) in pairs.items()}
    flops_dense = 2.0 * B * B * flat.shape[1]
    nbytes = X.numel() * X.element_size()
    rates = {  # achieved rates, from the wall-clock medians (CPU time in parentheses keys)
        "dense_gflops": flops_dense / med["dense"] / 1e6,
        "dense_out_gflops": flops_dense / med["dense_out"] / 1e6,
        "dense_gflops_cpu": flops_dense / cpu["dense"] / 1e6,
        "clone_gbps": 2 * nbytes / med["clone"] / 1e6,
        "clone_out_gbps": 2 * nbytes / med["clone_out"] / 1e6,
        "clone_gbps_cpu": 2 * nbytes / cpu["clone"] / 1e6,
        # bytes the gather reads (k partner rows per output row) + the output write
        "topk_gbps": (K + 1) * nbytes / med["topk"] / 1e6,
        "topk_gbps_cpu": (K + 1) * nbytes / cpu["topk"] / 1e6,
    }
    verdicts = {}
    threads = torch.get_num_threads()
    for key, (op, bound, text, *_) in TARGETS.items():
        if not applies(key, device.type, name, threads):
            continue
        def ok(value: float) -> bool:
            return value >= bound if op == ">=" else value <= bound
        verdicts[key] = {"target": text, "value": ratios[key], "pass": bool(ok(ratios[key])),
                         "value_cpu": cpu_ratios[key], "pass_cpu": bool(ok(cpu_ratios[key]))}
    # how the top-k calls ran: column-blocked or one embedding_bag (the adaptive choice, CPU)
    sparse = {"topk_calls": counter["calls"], "blocked_calls": counter["blocked"],
              "columns_per_block": Kn._sparse_block_columns(B, B, flat.shape[1], flat.element_size())}
    return {"case": name, "shape": list(shape), "device": str(device),
            "threads": threads, "timings": timings, "ratios": ratios,
            "cpu_ratios": cpu_ratios, "rates": rates, "sparse_path": sparse, "targets": verdicts}


def _tf32(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return fn()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _topk_with_weights(weights: Callable[[], torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    index, values = Fn.topk_sparse(weights(), K)
    return Fn.mix(values, X, index=index)


def machine_peaks() -> Dict[str, float]:
    """Single-thread sgemm rate and copy bandwidths of this machine (CPU time, best of 5)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        W, X = torch.rand(B, B), torch.rand(B, 3072)
        out = torch.empty_like(X)
        big = torch.rand(64 << 20)  # 256 MiB: far beyond the caches
        big_out = torch.empty_like(big)
        big_out.fill_(0)

        def best(fn: Callable[[], object], calls: int) -> float:
            fn()
            times = []
            for _ in range(5):
                c0 = time.process_time()
                for _ in range(calls):
                    fn()
                times.append((time.process_time() - c0) / calls)
            return min(times)

        gemm = best(lambda: torch.mm(W, X, out=out), 20)
        copy = best(lambda: big_out.copy_(big), 1)
        fresh = best(lambda: big.clone(), 1)
        nbytes = big.numel() * big.element_size()
        return {"sgemm_gflops_1thread": 2.0 * B * B * 3072 / gemm / 1e9,
                "copy_gbps_1thread": 2 * nbytes / copy / 1e9,
                "clone_fresh_gbps_1thread": 2 * nbytes / fresh / 1e9,
                "note": "CPU time, best of 5; GB/s count read + write"}
    finally:
        torch.set_num_threads(saved)


def add_matmul_floor(results: List[Dict[str, object]], sgemm_gflops: float) -> None:
    """CPU rows get ``matmul_floor/clone``: the dense mix's 2·B·B·P flops at the measured
    single-thread sgemm peak times the thread count, against the same run's clone. No dense
    float32 mix can beat it on this machine, so where it exceeds 1.5 the dense target is out
    of reach whatever the implementation."""
    for r in results:
        if r["device"] != "cpu":
            continue
        flops = 2.0 * B * B * math.prod(r["shape"])
        floor_ms = flops / (sgemm_gflops * 1e9 * r["threads"]) * 1e3
        r["ratios"]["matmul_floor/clone"] = floor_ms / r["timings"]["clone"]["median_ms"]
        r["cpu_ratios"]["matmul_floor/clone"] = floor_ms / r["timings"]["clone"]["cpu_median_ms"]


def machine_info(threads: List[int]) -> Dict[str, object]:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads,
        "mkl": torch.backends.mkl.is_available(),
        "blas": "mkl" if "BLAS_INFO=mkl" in torch.__config__.show() else "other",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    # the page size of mix's large CPU outputs (core/_pages.py): the kernel's THP settings and ours
    info["huge_pages"] = {"CMDA_HUGE_PAGES": os.environ.get("CMDA_HUGE_PAGES", "1 (default)")}
    for key in ("enabled", "defrag"):
        try:
            info["huge_pages"][f"thp_{key}"] = Path(f"/sys/kernel/mm/transparent_hugepage/{key}").read_text().strip()
        except OSError:
            pass
    try:  # other processes on the machine make timings noisy: record the load
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def print_table(results: List[Dict[str, object]]) -> None:
    cols = ["clone", "clone_huge", "dense", "topk", "dense_kernel", "topk_kernel", "clone_out", "dense_out", "topk_1bag",
            "dense+w", "topk+w", "mixup", "loop", "dense_f64", "topk_bmm"]
    label = lambda r: f"{r['device']}/{r['threads']}t/{r['case']}"  # noqa: E731
    print("\nmedian wall time per batch of B=128, milliseconds (process CPU time below, CPU rows)")
    print(f"{'device/threads/case':<22}" + "".join(f"{c:>11}" for c in cols))
    for r in results:
        for metric in ("median_ms", "cpu_median_ms"):
            if metric == "cpu_median_ms" and r["device"] != "cpu":
                continue
            row = f"{label(r) if metric == 'median_ms' else '  (cpu time)':<22}"
            for c in cols:
                v = r["timings"][c][metric]
                star = "*" if c == "loop" and "extrapolated_from_rows" in r["timings"][c] else ""
                row += f"{v:>10.3f}{star or ' '}"
            print(row)
    if any("extrapolated_from_rows" in r["timings"]["loop"] for r in results):
        print("  * loop timed on a few rows and extrapolated linearly to 128 rows (--quick)")
    keys = list(dict.fromkeys(k for r in results for k in r["ratios"]))
    print("\nratios of wall medians [CPU-time ratio, CPU rows]")
    print(f"{'device/threads/case':<22}" + "".join(f"{k:>23}" for k in keys))
    for r in results:
        cells = []
        for k in keys:
            if k not in r["ratios"]:
                cells.append(f"{'-':>23}")
                continue
            cell = f"{r['ratios'][k]:.2f}"
            if r["device"] == "cpu":
                cell += f" [{r['cpu_ratios'][k]:.2f}]"
            cells.append(f"{cell:>23}")
        print(f"{label(r):<22}" + "".join(cells))
    print("\nachieved rates (wall): dense GFLOP/s, clone GB/s (read+write), topk GB/s ((k+1) x batch)")
    for r in results:
        q = r["rates"]
        print(f"  {label(r):<22} dense {q['dense_gflops']:7.1f} (out= {q['dense_out_gflops']:7.1f}, "
              f"cpu {q['dense_gflops_cpu']:7.1f})  clone {q['clone_gbps']:6.1f} (out= "
              f"{q['clone_out_gbps']:6.1f})  topk {q['topk_gbps']:6.1f}")
    print("\nhow top-k ran (CPU: column-blocked calls / calls, the adaptive choice)")
    for r in results:
        sp = r.get("sparse_path", {})
        if r["device"] == "cpu" and sp.get("topk_calls"):
            print(f"  {label(r):<22} blocked {sp['blocked_calls']}/{sp['topk_calls']}, "
                  f"{sp['columns_per_block']} columns per block")
    print("\ntargets (verdict on wall medians; [cpu] = on CPU-time medians)")
    for r in results:
        for key, v in r["targets"].items():
            flag = "PASS" if v["pass"] else "FAIL"
            extra = ""
            if r["device"] == "cpu":
                extra = f"  [cpu {'PASS' if v['pass_cpu'] else 'FAIL'} {v['value_cpu']:.2f}]"
            print(f"  {flag}  {label(r):<22} {v['target']:<50} (measured {key} = {v['value']:.2f}){extra}")


def target_block(results: List[Dict[str, object]]) -> Dict[str, object]:
    """The ``targets`` block of the JSON: each target, where it applies, every measured ratio
    and its verdict, and whether it passed on every row it applies to. Targets whose rows were
    not measured in this run (e.g. the CUDA ones without a GPU) say so."""
    block = {}
    for key, (op, bound, text, devices, cases, counts) in TARGETS.items():
        rows = [{"device": r["device"], "threads": r["threads"], "case": r["case"], "value": r["targets"][key]["value"],
                 "pass": r["targets"][key]["pass"], "value_cpu": r["targets"][key]["value_cpu"]}
                for r in results if key in r["targets"]]
        block[key] = {"target": text, "comparison": op, "bound": bound, "devices": list(devices),
                      "cases": list(cases) if cases else "all", "threads": list(counts) if counts else "all",
                      "rows": rows, "pass": all(row["pass"] for row in rows) if rows else None}
    return block


def print_target_summary(block: Dict[str, object]) -> None:
    print("\ntarget summary (every row it applies to; n/a: no such row in this run)")
    for key, t in block.items():
        verdict = "n/a " if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        values = ", ".join(f"{row['device']}/{row['threads']}t/{row['case']} {row['value']:.2f}" for row in t["rows"])
        print(f"  {verdict}  {t['target']:<50} {key} {t['comparison']} {t['bound']:g}: {values or '-'}")


def start_busy(n: int) -> List[object]:
    """``n`` processes that spin on a core each: the noisy machine, reproducibly."""
    import subprocess

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv: Optional[List[str]] = None) -> int:
    default_threads = torch.get_num_threads()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds; loop at 224 extrapolated")
    parser.add_argument("--threads", type=int, nargs="*", default=None,
                        help=f"thread counts, one table each (default: 1 and {default_threads})")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per case")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--busy", type=int, default=0,
                        help="spin this many busy processes during the run (the noisy case; default out file "
                             "bench_mixing-busyN.json)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.out is None:
        suffix = f"-busy{args.busy}" if args.busy else ""
        args.out = ROOT / "benchmarks" / "results" / f"bench_mixing{suffix}.json"
    if args.repeats is None:
        args.repeats = 9 if args.quick else 31
    threads = args.threads or sorted({1, default_threads})
    devices = [torch.device("cpu")]
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda":
        devices = devices[1:] if len(devices) > 1 else devices
    if args.device == "cpu":
        devices = [torch.device("cpu")]

    total = len(threads) * len(devices) * len(args.cases) * 3
    bar = tqdm(total=total, desc="bench_mixing", leave=False, file=sys.stderr) if tqdm else None

    def progress(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label)
            bar.update(1)

    started = time.perf_counter()
    info = machine_info(threads)
    info["peaks"] = machine_peaks() if "cpu" in [d.type for d in devices] else {}
    results = []
    busy = start_busy(args.busy)
    if busy:  # a SIGTERM (e.g. from `timeout`) still stops the spinners
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            results += [bench_case(name, CASES[name], device, args, progress)
                        for device in devices for name in args.cases]
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    torch.set_num_threads(default_threads)
    if bar is not None:
        bar.close()
    if info["peaks"]:
        add_matmul_floor(results, info["peaks"]["sgemm_gflops_1thread"])
    wall = time.perf_counter() - started
    print_table(results)
    peaks = info["peaks"]
    if peaks:
        print(f"\nmachine (1 thread, CPU time): sgemm {peaks['sgemm_gflops_1thread']:.0f} GFLOP/s, "
              f"copy {peaks['copy_gbps_1thread']:.1f} GB/s, fresh clone "
              f"{peaks['clone_fresh_gbps_1thread']:.1f} GB/s (256 MiB)")
    print(f"wall time {wall:.1f} s, torch {torch.__version__}, threads {threads}")
    targets = target_block(results)
    print_target_summary(targets)
    payload = {"benchmark": "bench_mixing", "batch": B, "top_k": K, "quick": args.quick,
               "busy_processes": args.busy, "machine": info, "wall_s": wall, "targets": targets,
               "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
