"""Benchmark: an EmbeddingBank of N = 1,000,000 rows x d = 512 built with the default options.

Issue 15, item 5. The embeddings (two modalities, ``image`` and ``text``, of random
low-rank clusters: each row is ``center_k + z @ B_k + noise`` with ``z`` of rank ``--rank``,
the two modalities sharing the cluster of a row) are generated first, chunk by chunk, into two
raw float32 files. Each measured step then runs in a fresh process of its own, so its peak
RSS (``VmHWM``; ``ru_maxrss`` would carry the parent's peak across fork + exec) counts only
what that step holds:

1. **build** (disk-backed, the default of this benchmark) --
   ``EmbeddingBank.build(range(N), aligner, student="image", teachers="text", out=folder)``
   with the default options (``n_components=None``: BIC choice of M over 1..6, full
   covariances; banks over ``max_fit_rows`` rows fit on a random subsample): each batch is
   written to disk as it is embedded, the GMM is fitted on the subsample read back, the
   responsibilities are written chunk by chunk, the bank file is assembled and the bank is
   returned loaded (memory-mapped) from the folder. The aligner reads the rows of a batch from
   the files with ``os.preadv`` (like an encoder, it holds nothing between calls; page-cache
   reads do not count in the RSS). Reported: wall time, the time of the embedding (with the
   writes), of the GMM choice + fit, of the responsibilities pass, of the bank file's assembly
   and of the load, peak RSS and its ratio to one modality's table and to both.
1b. **build_memory** (the peer, ``--skip-memory`` leaves it out) -- the same build in memory
   (no ``out``), then ``bank.save``: time and peak RSS of each, and whether the saved file is
   the disk-backed build's, byte for byte (the SHA-256 both bank.json record).
2. **workers** -- ``EmbeddingBank.load(folder, mmap=True)`` and a ``DataLoader`` with
   ``--workers`` processes, each reading ``--reads`` batches of 256 random rows
   (``bank.rows``: every modality and the responsibilities). Each worker reports its RSS, USS
   and PSS (psutil ``memory_full_info``; PSS divides shared pages between the processes that
   map them, so it is the honest share of each).
3. **sklearn** -- ``sklearn.mixture.GaussianMixture`` with the same settings (M = 1..6, full,
   ``random_state=0``) on the same subsample the bank was fitted on: mean log-likelihood per
   M against ours (backed out of the bank's BIC table, which is ``-2 n ll + p log n``) and
   the M each criterion picks, and the chosen model's log-likelihood (``bank.gmm.score``).

Run ``python benchmarks/bench_bank.py`` (about 10 minutes on 2 cores; writes
``benchmarks/results/bench_bank.json`` and ``bench_bank.png``) or ``--quick`` (N = 30,000,
d = 32, 2 workers: under a minute; what the tests run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bench_bank.json"
MODALITIES = ("image", "text")
ROW_BATCH = 256


# ----------------------------------------------------------------------------- data


def generate(folder: Path, n: int, d: int, clusters: int, rank: int, noise: float, separation: float,
             seed: int) -> Dict[str, Any]:
    """Write ``image.f32`` and ``text.f32`` (``[n, d]`` float32, row-major) of random low-rank clusters.

    Centers are ``N(0, separation^2)`` per coordinate; each cluster spreads over its own random
    ``rank``-dimensional subspace with a total variance of about ``d`` (``z @ B``, B of rows with
    squared norm ``d / rank``) plus isotropic ``noise``.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n)
    params = {}
    for m in MODALITIES:
        centers = rng.normal(0.0, separation, (clusters, d)).astype(np.float32)
        bases = (rng.normal(0.0, 1.0, (clusters, rank, d)) / np.sqrt(rank)).astype(np.float32)
        params[m] = (centers, bases)
    step = 50_000
    for m in MODALITIES:
        centers, bases = params[m]
        with open(folder / f"{m}.f32", "wb") as handle:
            for start in range(0, n, step):
                lab = labels[start:start + step]
                z = rng.normal(0.0, 1.0, (len(lab), rank)).astype(np.float32)
                x = noise * rng.normal(0.0, 1.0, (len(lab), d)).astype(np.float32)
                for k in range(clusters):  # one product per cluster (bases[lab] would be [rows, rank, d])
                    mine = lab == k
                    x[mine] += centers[k] + z[mine] @ bases[k]
                handle.write(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return {"clusters": clusters, "rank": rank, "noise": noise, "separation": separation, "seed": seed,
            "cluster_sizes": np.bincount(labels, minlength=clusters).tolist()}


class FileAligner:
    """Embeds by dataset index: reads rows ``[min(idx), max(idx)]`` of ``<modality>.f32`` with ``os.preadv``."""

    modalities = MODALITIES
    embeds_by_index = True

    def __init__(self, folder: Path, d: int) -> None:
        self.d = d
        self.fds = {m: os.open(folder / f"{m}.f32", os.O_RDONLY) for m in MODALITIES}
        self.last_call = time.perf_counter()

    def embed(self, modality: str, indices: torch.Tensor) -> torch.Tensor:
        lo, hi = int(indices.min()), int(indices.max()) + 1
        out = np.empty((hi - lo, self.d), dtype=np.float32)
        os.preadv(self.fds[modality], [memoryview(out).cast("B")], lo * self.d * 4)
        rows = torch.from_numpy(out)
        self.last_call = time.perf_counter()
        return rows if hi - lo == len(indices) else rows[indices - lo]


def peak_rss_bytes() -> int:
    """Peak RSS of this process: ``VmHWM`` (reset by exec) where there is /proc, else ``ru_maxrss``.

    Linux keeps ``ru_maxrss`` across fork + exec, so a child would report its parent's peak;
    ``VmHWM`` belongs to the address space of this program only.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ----------------------------------------------------------------------------- step 1: build + save


def _bank_facts(bank: Any, folder: Path) -> Dict[str, Any]:
    meta = bank.metadata
    embeddings_bytes = sum(t.numel() * t.element_size() for t in bank.embeddings.values())
    record = json.loads((folder / "bank.json").read_text())["files"]["bank.safetensors"]
    return {"embeddings_bytes": embeddings_bytes, "one_modality_bytes": embeddings_bytes // len(bank.embeddings),
            "n_components": bank.n_components, "fit_rows": meta.get("fit_rows"),
            "n_components_scores": meta.get("n_components_scores"), "gmm_converged": meta.get("gmm_converged"),
            "gmm_n_iter": getattr(bank.gmm, "n_iter_", None), "dca_inert": meta.get("dca_inert"),
            "bank_file_bytes": record["bytes"], "bank_sha256": record["sha256"]}


def _timed(module: Any, name: str, timed: Dict[str, float], key: str) -> None:
    """Wrap ``module.name`` so that its wall time (and the time it ended) goes to ``timed``."""
    inner = getattr(module, name)

    def wrapper(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        out = inner(*a, **k)
        timed[key + "_end"] = time.perf_counter()
        timed[key] = timed[key + "_end"] - start
        return out

    setattr(module, name, wrapper)


def vm_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def phase_build(args: argparse.Namespace) -> Dict[str, Any]:
    """The disk-backed build: ``EmbeddingBank.build(..., out=folder)``."""
    from cmda_data import EmbeddingBank
    from cmda_data.bank import _disk

    work = Path(args.work)
    aligner = FileAligner(work, args.d)
    timed: Dict[str, float] = {}
    _timed(_disk, "fit_model", timed, "choice_and_fit_s")
    _timed(_disk, "write_responsibilities", timed, "responsibilities_s")
    _timed(_disk, "write_bank", timed, "write_s")
    rss_start = peak_rss_bytes()
    start = time.perf_counter()
    bank = EmbeddingBank.build(range(args.n), aligner, student="image", teachers="text", out=work / "bank",
                               overwrite=True, progress=not args.no_progress)
    end = time.perf_counter()
    return dict(_bank_facts(bank, work / "bank"), mode="disk", build_s=end - start, embed_s=aligner.last_call - start,
                choice_and_fit_s=timed["choice_and_fit_s"], responsibilities_s=timed["responsibilities_s"],
                write_s=timed["write_s"], load_s=end - timed["write_s_end"],
                peak_rss_start_bytes=rss_start, peak_rss_build_bytes=peak_rss_bytes(),
                rss_after_bytes=vm_rss_bytes(),
                ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def phase_build_memory(args: argparse.Namespace) -> Dict[str, Any]:
    """The in-memory build (no ``out``), then ``save``: the peer of the disk-backed build."""
    from cmda_data import EmbeddingBank
    from cmda_data.bank import _fit

    work = Path(args.work)
    aligner = FileAligner(work, args.d)
    timed: Dict[str, float] = {}
    _timed(_fit, "responsibilities", timed, "responsibilities_s")
    rss_start = peak_rss_bytes()
    start = time.perf_counter()
    bank = EmbeddingBank.build(range(args.n), aligner, student="image", teachers="text",
                               progress=not args.no_progress)
    build_s = time.perf_counter() - start
    embed_s = aligner.last_call - start
    rss_build = peak_rss_bytes()
    start = time.perf_counter()
    bank.save(work / "bank_memory", progress=not args.no_progress)
    save_s = time.perf_counter() - start
    return dict(_bank_facts(bank, work / "bank_memory"), mode="memory", build_s=build_s, embed_s=embed_s,
                gmm_s=build_s - embed_s, responsibilities_s=timed.get("responsibilities_s"),
                choice_and_fit_s=build_s - embed_s - timed.get("responsibilities_s", 0.0), save_s=save_s,
                peak_rss_start_bytes=rss_start, peak_rss_build_bytes=rss_build,
                peak_rss_save_bytes=peak_rss_bytes(),
                ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


# ----------------------------------------------------------------------------- step 2: workers


class RandomRows(torch.utils.data.Dataset):
    """Item ``i``: ``ROW_BATCH`` random bank rows (all modalities + responsibilities) and this process's memory."""

    def __init__(self, bank: Any, reads: int, seed: int) -> None:
        self.bank, self.reads, self.seed = bank, reads, seed

    def __len__(self) -> int:
        return self.reads

    def __getitem__(self, i: int) -> Dict[str, Any]:
        import psutil

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        rows = torch.randint(0, len(self.bank), (ROW_BATCH,), generator=g)
        got = self.bank.rows(rows)
        total = sum(float(t.sum()) for t in got.embeddings.values()) + float(got.responsibilities.sum())
        info = psutil.Process().memory_full_info()
        worker = torch.utils.data.get_worker_info()
        return {"worker": -1 if worker is None else worker.id, "pid": os.getpid(), "checksum": total,
                "rss": info.rss, "uss": info.uss, "pss": getattr(info, "pss", None)}


def phase_workers(args: argparse.Namespace) -> Dict[str, Any]:
    import psutil

    from cmda_data import EmbeddingBank

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 8 workers on 2 cores: on purpose
    start = time.perf_counter()
    bank = EmbeddingBank.load(Path(args.work) / "bank", mmap=True)
    load_s = time.perf_counter() - start
    main_after_load = psutil.Process().memory_full_info()
    loader = torch.utils.data.DataLoader(RandomRows(bank, args.reads * args.workers, seed=1), batch_size=None,
                                         num_workers=args.workers, shuffle=False)
    per_worker: Dict[int, Dict[str, Any]] = {}
    start = time.perf_counter()
    for count, item in enumerate(loader, start=1):
        per_worker[item["worker"]] = {k: item[k] for k in ("pid", "rss", "uss", "pss")}  # the last read counts
        if count == max(1, len(loader.dataset) - 2 * args.workers):  # the workers are alive and have read
            main = psutil.Process().memory_full_info()
    read_s = time.perf_counter() - start
    workers = [per_worker[k] for k in sorted(per_worker)]
    mean = {k: float(np.mean([w[k] for w in workers])) if workers[0][k] is not None else None
            for k in ("rss", "uss", "pss")}
    return {"load_s": load_s, "read_s": read_s, "workers": args.workers, "reads_per_worker": args.reads,
            "rows_per_read": ROW_BATCH, "per_worker": workers, "worker_mean": mean,
            "main_after_load": {"rss": main_after_load.rss, "uss": main_after_load.uss,
                                "pss": getattr(main_after_load, "pss", None)},
            "main": {"rss": main.rss, "uss": main.uss, "pss": getattr(main, "pss", None)},
            "pss_total": None if mean["pss"] is None else main.pss + sum(w["pss"] for w in workers),
            "bank_file_bytes": (Path(args.work) / "bank" / "bank.safetensors").stat().st_size,
            "peak_rss_main_bytes": peak_rss_bytes()}


# ----------------------------------------------------------------------------- step 3: sklearn


def n_parameters(m: int, d: int) -> int:
    return int(m * d * (d + 1) / 2 + m * d + m - 1)


def phase_sklearn(args: argparse.Namespace) -> Dict[str, Any]:
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    from cmda_data import EmbeddingBank, GaussianMixture
    from cmda_data.bank._fit import MAX_FIT_ROWS, fit_subsample

    bank = EmbeddingBank.load(Path(args.work) / "bank", mmap=True)
    teacher = bank.embeddings[bank.metadata["fit_on"]]
    rows = fit_subsample(len(bank), MAX_FIT_ROWS, 0)
    sample = (teacher if rows is None else teacher[rows]).double().numpy()
    n, d = sample.shape
    ours_scores = {int(m): s for m, s in bank.metadata["n_components_scores"].items()}
    table = []
    for m, bic in sorted(ours_scores.items()):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sk = SkGaussianMixture(m, random_state=0).fit(sample)
        ll_sk, ll_ours = float(sk.score(sample)), (n_parameters(m, d) * np.log(n) - bic) / (2 * n)
        row = {"m": m, "ll_ours": ll_ours, "ll_sklearn": ll_sk, "rel_diff": abs(ll_ours - ll_sk) / abs(ll_sk),
               "bic_ours": bic, "bic_sklearn": float(sk.bic(sample)), "sklearn_s": time.perf_counter() - start,
               "sklearn_converged": bool(sk.converged_)}
        if row["rel_diff"] > 1e-3:  # another local optimum? start scikit-learn where ours started
            start = GaussianMixture(m, random_state=0, max_iter=0).fit(torch.from_numpy(sample))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                same = SkGaussianMixture(m, random_state=0, weights_init=start.weights_.numpy(),
                                         means_init=start.means_.numpy(),
                                         precisions_init=start.precisions_.numpy()).fit(sample)
            row["ll_sklearn_same_start"] = float(same.score(sample))
            row["rel_diff_same_start"] = abs(ll_ours - row["ll_sklearn_same_start"]) / abs(ll_sk)
        table.append(row)
    chosen = bank.n_components
    sk_chosen = min(table, key=lambda r: (r["bic_sklearn"], r["m"]))["m"]
    fit_row = next(r for r in table if r["m"] == chosen)
    ll_fit = float(bank.gmm.score(sample))
    return {"fit_rows": n, "per_m": table, "m_ours": chosen, "m_sklearn": sk_chosen,
            "fit_ll_ours": ll_fit, "fit_ll_sklearn": fit_row["ll_sklearn"],
            "fit_rel_diff": abs(ll_fit - fit_row["ll_sklearn"]) / abs(fit_row["ll_sklearn"]),
            "max_rel_diff": max(r["rel_diff"] for r in table),
            "max_rel_diff_same_start": max(r.get("rel_diff_same_start", r["rel_diff"]) for r in table)}


# ----------------------------------------------------------------------------- driver


def run_phase(phase: str, args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Run one step in a fresh interpreter (its own peak RSS) and read its JSON."""
    out = work / f"{phase}.json"
    cmd = [sys.executable, __file__, "--phase", phase, "--work", str(work), "--n", str(args.n), "--d", str(args.d),
           "--workers", str(args.workers), "--reads", str(args.reads)] + (["--no-progress"] if args.no_progress else [])
    subprocess.run(cmd, check=True, env=dict(os.environ, BENCH_BANK_OUT=str(out)))
    return json.loads(out.read_text())


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def report(result: Dict[str, Any]) -> None:
    b, m, w, s = result["build"], result.get("build_memory"), result["workers"], result.get("sklearn")
    r = result["ratios"]
    print(f"N = {result['config']['n']:,} x d = {result['config']['d']} (2 modalities, embeddings "
          f"{gib(b['embeddings_bytes'])}; one modality {gib(b['one_modality_bytes'])})")
    print(f"disk-backed build (out=folder): {b['build_s']:.1f} s (embedding + writes {b['embed_s']:.1f} s, BIC "
          f"choice + EM fit on {b['fit_rows']:,} rows {b['choice_and_fit_s']:.1f} s, responsibilities of all rows "
          f"{b['responsibilities_s']:.1f} s, bank file {b['write_s']:.1f} s, load {b['load_s']:.1f} s); "
          f"M = {b['n_components']}")
    print(f"peak RSS: {gib(b['peak_rss_build_bytes'])} = {r['build_peak_to_one_modality']:.2f}x one modality, "
          f"{r['build_peak_to_embeddings']:.2f}x both (baseline after imports {gib(b['peak_rss_start_bytes'])}; "
          f"RSS at the end {gib(b['rss_after_bytes'])})")
    if m:
        print(f"in-memory build: {m['build_s']:.1f} s, peak RSS {gib(m['peak_rss_build_bytes'])} = "
              f"{r['memory_build_peak_to_one_modality']:.2f}x one modality, {r['memory_build_peak_to_embeddings']:.2f}x "
              f"both; save {m['save_s']:.1f} s (peak {gib(m['peak_rss_save_bytes'])}); same bank file as the "
              f"disk-backed build: {result['same_bank_file']}")
    print(f"{w['workers']} workers, mmap load ({w['load_s']:.1f} s), {w['reads_per_worker']} reads of "
          f"{w['rows_per_read']} random rows each: per worker RSS {gib(w['worker_mean']['rss'])}, USS "
          f"{gib(w['worker_mean']['uss'])}, PSS {gib(w['worker_mean']['pss'] or 0)}; main PSS "
          f"{gib(w['main']['pss'] or 0)}; PSS of all {w['workers'] + 1} processes {gib(w['pss_total'] or 0)} "
          f"(bank file {gib(w['bank_file_bytes'])})")
    if s:
        for r in s["per_m"]:
            same = (f" (sklearn from our start {r['ll_sklearn_same_start']:.6f}, rel {r['rel_diff_same_start']:.2e})"
                    if "rel_diff_same_start" in r else "")
            print(f"  M={r['m']}: ll ours {r['ll_ours']:.6f} sklearn {r['ll_sklearn']:.6f} rel {r['rel_diff']:.2e}"
                  + same)
        print(f"sklearn on the same {s['fit_rows']:,} rows: M ours {s['m_ours']}, sklearn {s['m_sklearn']}; "
              f"fit ll rel diff {s['fit_rel_diff']:.2e}; max over M {s['max_rel_diff']:.2e} "
              f"({s['max_rel_diff_same_start']:.2e} from the same start)")


def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, m, w, s = result["build"], result.get("build_memory"), result["workers"], result.get("sklearn")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    parts = [("embedding + writes", b["embed_s"]), ("BIC choice + fit", b["choice_and_fit_s"]),
             ("responsibilities", b["responsibilities_s"]), ("bank file", b["write_s"]), ("load", b["load_s"])]
    axes[0].barh([p[0] for p in parts][::-1], [p[1] for p in parts][::-1], color="tab:blue",
                 label="disk-backed build, by step")
    if m:
        axes[0].barh(["in-memory build", "in-memory save"], [m["build_s"], m["save_s"]], color="tab:gray",
                     label="in-memory peer")
    axes[0].axvline(300, color="tab:red", ls="--", label="5 min target (build)")
    axes[0].set_xlabel("seconds")
    axes[0].set_title(f"N={result['config']['n']:,}, d={result['config']['d']}: disk-backed build {b['build_s']:.0f} s")
    axes[0].legend(loc="lower right", fontsize=8)
    labels = ["disk build", "in-mem build", "main (8w)"] + [f"w{i}" for i in range(len(w["per_worker"]))]
    rss = [b["peak_rss_build_bytes"], m["peak_rss_build_bytes"] if m else np.nan, w["main"]["rss"]] + [
        x["rss"] for x in w["per_worker"]]
    pss = [np.nan, np.nan, w["main"]["pss"] or np.nan] + [x["pss"] or np.nan for x in w["per_worker"]]
    xs = np.arange(len(labels))
    axes[1].bar(xs - 0.2, np.array(rss, dtype=float) / 2**30, 0.4, label="RSS (peak for the builds)")
    axes[1].bar(xs + 0.2, np.array(pss, dtype=float) / 2**30, 0.4, label="PSS")
    axes[1].axhline(2 * b["one_modality_bytes"] / 2**30, color="tab:red", ls="--", label="2x one modality")
    axes[1].axhline(b["embeddings_bytes"] / 2**30, color="tab:orange", ls=":", label="both modalities")
    axes[1].set_xticks(xs, labels, rotation=45)
    axes[1].set_ylabel("GiB")
    axes[1].set_title("memory")
    axes[1].legend(fontsize=8)
    if s:
        ms = [r["m"] for r in s["per_m"]]
        axes[2].plot(ms, [r["bic_ours"] for r in s["per_m"]], "o-", label="cmda_data")
        axes[2].plot(ms, [r["bic_sklearn"] for r in s["per_m"]], "x--", label="sklearn")
        axes[2].set_xlabel("M")
        axes[2].set_ylabel("BIC")
        axes[2].set_title(f"BIC, {s['fit_rows']:,}-row subsample")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=48)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--separation", type=float, default=3.0, help="scale of the cluster centers")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--reads", type=int, default=200, help="batches of 256 random rows per worker")
    parser.add_argument("--quick", action="store_true", help="N = 30,000, d = 32, rank 8, 2 workers, 20 reads")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the in-memory build (the peer)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--phase", choices=("build", "build_memory", "workers", "sklearn"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        result = {"build": phase_build, "build_memory": phase_build_memory, "workers": phase_workers,
                  "sklearn": phase_sklearn}[args.phase](args)
        Path(os.environ["BENCH_BANK_OUT"]).write_text(json.dumps(result))
        return
    if args.quick:
        args.n, args.d, args.rank, args.workers, args.reads = 30_000, 32, 8, 2, 20
    temporary = args.work is None
    scratch = Path(args.work or tempfile.mkdtemp(prefix="bench_bank-"))
    scratch.mkdir(parents=True, exist_ok=True)
    args.work = str(scratch)
    try:
        load_before = os.getloadavg()
        start = time.perf_counter()
        data = generate(scratch, args.n, args.d, args.clusters, args.rank, args.noise, args.separation, seed=0)
        generate_s = time.perf_counter() - start
        result: Dict[str, Any] = {"issue": 15, "quick": args.quick}
        result["build"] = run_phase("build", args, scratch)
        result["build_memory"] = None if args.skip_memory else run_phase("build_memory", args, scratch)
        shutil.rmtree(scratch / "bank_memory", ignore_errors=True)  # its SHA-256 is recorded: free the disk
        result["workers"] = run_phase("workers", args, scratch)
        result["sklearn"] = None if args.skip_sklearn else run_phase("sklearn", args, scratch)
    finally:
        if temporary:
            shutil.rmtree(scratch, ignore_errors=True)
    from cmda_data.bank._fit import MAX_FIT_ROWS

    b, m = result["build"], result["build_memory"]
    result["same_bank_file"] = None if m is None else m["bank_sha256"] == b["bank_sha256"]
    result["config"] = {"n": args.n, "d": args.d, "modalities": list(MODALITIES), "data": data,
                        "generate_s": generate_s, "bank_options": "EmbeddingBank.build defaults",
                        "max_fit_rows": MAX_FIT_ROWS, "workers": args.workers, "reads": args.reads,
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "loadavg_before": load_before,
                        "loadavg_after": os.getloadavg()}
    result["ratios"] = {"build_peak_to_embeddings": b["peak_rss_build_bytes"] / b["embeddings_bytes"],
                        "build_peak_to_one_modality": b["peak_rss_build_bytes"] / b["one_modality_bytes"]}
    if m:
        result["ratios"].update(
            memory_build_peak_to_embeddings=m["peak_rss_build_bytes"] / m["embeddings_bytes"],
            memory_build_peak_to_one_modality=m["peak_rss_build_bytes"] / m["one_modality_bytes"],
            memory_save_peak_to_embeddings=m["peak_rss_save_bytes"] / m["embeddings_bytes"])
    result["targets"] = {"build_s<=300": b["build_s"] <= 300,
                         "build_peak<=2x_one_modality": result["ratios"]["build_peak_to_one_modality"] <= 2.0,
                         "build_peak<=2x_embeddings": result["ratios"]["build_peak_to_embeddings"] <= 2.0,
                         "ll_rel_diff<=1e-3": None if not result["sklearn"] else
                         result["sklearn"]["max_rel_diff"] <= 1e-3}
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
