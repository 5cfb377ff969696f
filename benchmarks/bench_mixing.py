"""Speed of CMDA mixing against the official code's loop, torchvision MixUp and a clone.

Batch B = 128 student samples of three kinds (1024-d vectors, 3x32x32 and 3x224x224
images), on the CPU (and CUDA when available, timed with ``torch.cuda.synchronize``):

* ``dense``   -- ``functional.mix(W, X)``: one matmul over the flattened samples (weights
  precomputed; ``dense+w`` also times Eq. 10 + Alg. 1 weights from 128-d latents).
* ``topk``    -- ``functional.mix(values, X, index=index)`` with 8 partners per row (sparse
  path; ``topk+w`` also times the weights and ``topk_sparse``).
* ``loop``    -- a faithful re-creation of the official code (official-code-notes.md §1.1,
  §6): for each row ``i``: ``g = zeros_like(x[0])``; for each ``j``: ``g += W[i, j] * X[j]``;
  then ``torch.stack``.
* ``mixup``   -- ``torchvision.transforms.v2.MixUp(num_classes=10)`` on the same batch with
  integer labels (vectors are viewed as ``[B, 1, 1, 1024]`` images, which it requires).
* ``clone``   -- ``X.clone()``: the cost of writing one new batch.

Diagnostics (not targets): ``dense_out`` / ``clone_out`` write into a preallocated buffer
(isolating the cost of allocating fresh output pages), ``dense_f64`` runs in float64 and
``topk_bmm`` is the gather + ``bmm`` formulation of the sparse path.

Usage::

    python benchmarks/bench_mixing.py            # full run (about 1-3 minutes on 2 cores)
    python benchmarks/bench_mixing.py --quick    # fewer repeats; loop at 224 extrapolated
    python benchmarks/bench_mixing.py --threads 2

Writes ``benchmarks/results/bench_mixing.json``.
"""

from __future__ import annotations

import argparse
import json
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

from cmda_data import functional as Fn  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is in the bench extra
    tqdm = None

B = 128
K = 8
LATENT = 128
CASES = {"vec1024": (1024,), "img32": (3, 32, 32), "img224": (3, 224, 224)}
TARGETS = {  # name: (ratio, comparison, bound, text)
    "loop/dense": (">=", 15.0, "dense >= 15x faster than loop"),
    "dense/clone": ("<=", 1.5, "dense <= 1.5x clone"),
    "topk/clone": ("<=", 1.2, "topk(8) <= 1.2x clone"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int = 2,
           budget_s: float = 1.0) -> Dict[str, float]:
    """Median (and spread) of ``repeats`` timed calls after ``warmup`` calls, in ms.

    Stops early once ``budget_s`` is spent (at least 3 timed calls).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    spent = 0.0
    while len(times) < repeats and (len(times) < 3 or spent < budget_s):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    ms = [t * 1e3 for t in times]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


def official_loop(W: torch.Tensor, X: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
    """The official code's generation: one zero buffer per row, B scalar x sample adds."""
    generated = []
    for i in range(W.shape[0] if rows is None else rows):
        g = torch.zeros_like(X[0])
        for j in range(W.shape[1]):
            g += W[i, j] * X[j]
        generated.append(g)
    return torch.stack(generated)


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
    torch.testing.assert_close(Fn.mix(values, X, index=index), Fn.mix(dense_topk, X), rtol=1e-4, atol=1e-5)

    reps = args.repeats
    budget = 0.25 if args.quick else 1.0
    jobs = {
        "clone": (lambda: X.clone(), reps),
        "dense": (lambda: Fn.mix(W, X), reps),
        "topk": (lambda: Fn.mix(values, X, index=index), reps),
        "dense+w": (lambda: Fn.mix(weights(), X), reps),
        "topk+w": (lambda: _topk_with_weights(weights, X), reps),
        "mixup": (lambda: mixup(X_img, labels), reps),
        # diagnostics
        "clone_out": (lambda: clone_buf.copy_(X), reps),
        "dense_out": (lambda: torch.mm(W, flat, out=out_buf), reps),
        "dense_f64": (lambda: Fn.mix(W64, X64), max(3, reps // 2)),
        "topk_bmm": (lambda: Fn._mix_sparse_bmm(index, values, flat), max(3, reps // 2)),
    }
    timings: Dict[str, Dict[str, float]] = {}
    for job, (fn, n_rep) in jobs.items():
        timings[job] = timeit(fn, device, repeats=n_rep, budget_s=budget)
        progress(f"{device.type}/{name}/{job}")

    # the loop: full, or a few rows extrapolated linearly when --quick and it is slow
    rows = B
    if args.quick and name == "img224":
        rows = 8
    loop_reps = 3 if not args.quick else 2
    t = timeit(lambda: official_loop(W, X, rows), device, repeats=loop_reps, warmup=1, budget_s=budget)
    if rows != B:
        t = {k: (v * B / rows if k.endswith("_ms") else v) for k, v in t.items()}
        t["extrapolated_from_rows"] = rows
    timings["loop"] = t
    progress(f"{device.type}/{name}/loop")

    med = {k: v["median_ms"] for k, v in timings.items()}
    ratios = {
        "loop/dense": med["loop"] / med["dense"],
        "loop/topk": med["loop"] / med["topk"],
        "dense/clone": med["dense"] / med["clone"],
        "topk/clone": med["topk"] / med["clone"],
        "mixup/clone": med["mixup"] / med["clone"],
        # diagnostics: both sides writing into preallocated buffers
        "dense_out/clone_out": med["dense_out"] / med["clone_out"],
        "topk_bmm/topk": med["topk_bmm"] / med["topk"],
    }
    verdicts = {}
    for key, (op, bound, text) in TARGETS.items():
        ok = ratios[key] >= bound if op == ">=" else ratios[key] <= bound
        verdicts[key] = {"target": text, "value": ratios[key], "pass": bool(ok)}
    return {"case": name, "shape": list(shape), "device": str(device), "timings": timings,
            "ratios": ratios, "targets": verdicts}


def _topk_with_weights(weights: Callable[[], torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    index, values = Fn.topk_sparse(weights(), K)
    return Fn.mix(values, X, index=index)


def machine_info(threads: int) -> Dict[str, object]:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads,
        "mkl": torch.backends.mkl.is_available(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
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
    cols = ["clone", "dense", "topk", "dense+w", "topk+w", "loop", "mixup", "dense_out", "clone_out",
            "dense_f64", "topk_bmm"]
    print("\nmedian time per batch of B=128, milliseconds")
    print(f"{'device/case':<16}" + "".join(f"{c:>11}" for c in cols))
    for r in results:
        row = f"{r['device'] + '/' + r['case']:<16}"
        for c in cols:
            v = r["timings"][c]["median_ms"]
            star = "*" if c == "loop" and "extrapolated_from_rows" in r["timings"][c] else ""
            row += f"{v:>10.3f}{star or ' '}"
        print(row)
    if any("extrapolated_from_rows" in r["timings"]["loop"] for r in results):
        print("  * loop timed on a few rows and extrapolated linearly to 128 rows (--quick)")
    keys = ["loop/dense", "loop/topk", "dense/clone", "topk/clone", "mixup/clone",
            "dense_out/clone_out", "topk_bmm/topk"]
    print("\nratios")
    print(f"{'device/case':<16}" + "".join(f"{k:>20}" for k in keys))
    for r in results:
        print(f"{r['device'] + '/' + r['case']:<16}" + "".join(f"{r['ratios'][k]:>20.2f}" for k in keys))
    print("\ntargets")
    for r in results:
        for key, v in r["targets"].items():
            flag = "PASS" if v["pass"] else "FAIL"
            print(f"  {flag}  {r['device'] + '/' + r['case']:<16} {v['target']:<32} (measured {key} = {v['value']:.2f})")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; loop at 224 extrapolated")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_mixing.json")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 7 if args.quick else 21
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda":
        devices = devices[1:] if len(devices) > 1 else devices
    if args.device == "cpu":
        devices = [torch.device("cpu")]

    total = len(devices) * len(args.cases) * 11
    bar = tqdm(total=total, desc="bench_mixing", leave=False, file=sys.stderr) if tqdm else None

    def progress(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label)
            bar.update(1)

    started = time.perf_counter()
    results = [bench_case(name, CASES[name], device, args, progress)
               for device in devices for name in args.cases]
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - started
    print_table(results)
    print(f"\nwall time {wall:.1f} s, torch {torch.__version__}, threads {args.threads}")
    payload = {"benchmark": "bench_mixing", "batch": B, "top_k": K, "quick": args.quick,
               "machine": machine_info(args.threads), "wall_s": wall, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
