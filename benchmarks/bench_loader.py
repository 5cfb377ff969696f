"""Throughput of a DataLoader with CMDACollate vs default_collate alone vs torchvision MixUp.

Same dataset, same loader settings (2 worker processes, persistent, batch 64, shuffled,
4096 samples of a 3x32x32 image, a 384-d text embedding and a label). The loaders run
interleaved: each *round* runs one epoch of every loader, back to back, in an order that
rotates from round to round (so a drift of a shared machine, or being first after a pause,
hits every loader alike); one warm-up round first.

Two datasets:

* ``cifar`` (the target): images stored as uint8 HWC arrays, converted to float CHW and
  augmented per sample (random crop with 4-pixel padding, horizontal flip) in
  ``__getitem__``, as a CIFAR training pipeline does.
* ``tensors`` (worst case, reported): images already float tensors, ``__getitem__`` only
  indexes them, so the loader does almost nothing besides the collate.

Loaders (``collate_fn``):

* ``default`` -- ``torch.utils.data.default_collate``;
* ``mixup``   -- ``default_collate`` then ``torchvision.transforms.v2.MixUp(num_classes=10)``;
* ``cmda``    -- ``CMDACollate(bank, target="label", num_classes=10)`` (p=0.5, the whole batch
  as pool, soft Eq. 11 weights from a bank of random unit 128-d embeddings with a
  GMM of M=2 fitted on the teacher's);
* ``cmda_top8`` -- the same with ``top_k=8`` (sparse mixing).

Two figures per loader:

* **samples/s (wall clock)** -- the issue's metric. Per round, the ratio of a loader's
  samples/s to ``default``'s in the same round (paired: the two epochs ran seconds apart);
  the figure is the median of these per-round ratios (with the lower / upper quartile),
  beside the median samples/s of each loader.
* **CPU time per sample** (main process + workers, from ``/proc``): what a CPU-bound loader
  on free cores would deliver; much less sensitive to other jobs on the machine than the
  wall clock. Also reported as the median of per-round paired ratios.

Target: ``cmda`` >= 0.8x ``default`` in samples/s (wall clock, median paired ratio) on both
datasets; the CPU-time ratios are printed beside it. On a loaded machine the wall-clock
quartiles are wide: read them before trusting a single figure. Between runs a few minutes
apart the load of a shared machine can move both ratios by 0.2 or more (other jobs slow the
main process, which receives default_collate's four shared-memory segments per batch, or the
workers, which do CMDA's work): run it more than once.

Usage::

    python benchmarks/bench_loader.py            # 15 rounds, about 2-3 minutes on 2 cores
    python benchmarks/bench_loader.py --quick    # 5 rounds

Writes ``benchmarks/results/bench_loader.json``.
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
from typing import Any, Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmda_data.bank import EmbeddingBank  # noqa: E402
from cmda_data.augment.collate import CMDACollate  # noqa: E402
from cmda_data.augment.dataset import IndexedDataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_loader.json"
N, BATCH, WORKERS, NUM_CLASSES, TEXT_DIM, LATENT_DIM = 4096, 64, 2, 10, 384, 128
TARGET = 0.8


class TensorImages(Dataset):
    """Float images already in memory: ``__getitem__`` only indexes."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(N, 3, 32, 32, generator=g)
        self.texts = torch.randn(N, TEXT_DIM, generator=g)
        self.labels = torch.randint(0, NUM_CLASSES, (N,), generator=g).tolist()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {"image": self.images[i], "text": self.texts[i], "label": self.labels[i]}


class CifarLike(TensorImages):
    """uint8 HWC images, converted and augmented per sample (crop with padding 4, flip)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.raw = (self.images.permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy()
        del self.images

    def __getitem__(self, i: int) -> Dict[str, Any]:
        image = torch.from_numpy(np.ascontiguousarray(self.raw[i])).permute(2, 0, 1).float().div_(255)
        padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
        top, left = np.random.randint(0, 9, size=2)
        image = padded[:, top:top + 32, left:left + 32]
        if np.random.rand() < 0.5:
            image = image.flip(-1)
        return {"image": image.contiguous(), "text": self.texts[i], "label": self.labels[i]}


class MixUpCollate:
    """``default_collate`` then torchvision's v2 MixUp on (image, label)."""

    def __init__(self) -> None:
        from torchvision.transforms import v2

        self.mixup = v2.MixUp(num_classes=NUM_CLASSES)

    def __call__(self, samples: List[Any]) -> Dict[str, Any]:
        batch = default_collate(samples)
        batch["image"], batch["label"] = self.mixup(batch["image"], batch["label"])
        return batch


def make_bank() -> EmbeddingBank:
    g = torch.Generator().manual_seed(1)
    unit = lambda: torch.nn.functional.normalize(torch.randn(N, LATENT_DIM, generator=g), dim=1)  # noqa: E731
    bank = EmbeddingBank.from_embeddings({"image": unit(), "text": unit()}, student="image", teachers="text",
                                         n_components=2)
    return bank.share_memory_()


def _worker_cpu(loader: DataLoader) -> float:
    """CPU seconds (user + system) used so far by the loader's persistent worker processes."""
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for worker in workers:
        try:
            fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # not Linux, or the worker is gone
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def epoch_stats(loader: DataLoader) -> Dict[str, float]:
    """One epoch: wall seconds, and CPU seconds of the main process and of the workers."""
    wall, main_cpu, worker_cpu = time.perf_counter(), time.process_time(), _worker_cpu(loader)
    seen = 0
    for batch in loader:
        seen += len(batch["index"])
    return {"samples": seen, "wall": time.perf_counter() - wall, "main_cpu": time.process_time() - main_cpu,
            "worker_cpu": _worker_cpu(loader) - worker_cpu}


def _quartiles(values: List[float]) -> Dict[str, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3}


def run_dataset(name: str, dataset: Dataset, collates: Dict[str, Any], rounds: int) -> Dict[str, Any]:
    loaders = {key: DataLoader(IndexedDataset(dataset), batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                               persistent_workers=True, collate_fn=fn,
                               generator=torch.Generator().manual_seed(0))
               for key, fn in collates.items()}
    keys = list(loaders)
    stats: Dict[str, List[Dict[str, float]]] = {key: [] for key in loaders}
    for key, loader in loaders.items():  # warm-up: start the workers, fill caches
        epoch_stats(loader)
    for r in range(rounds):  # interleaved, order rotated every round
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            fn = collates[key]
            if hasattr(fn, "set_epoch"):
                fn.set_epoch(r + 1)
            stats[key].append(epoch_stats(loaders[key]))
    del loaders
    rates = {key: [e["samples"] / e["wall"] for e in values] for key, values in stats.items()}
    costs = {key: [(e["main_cpu"] + e["worker_cpu"]) / e["samples"] for e in values] for key, values in stats.items()}
    wall_ratio = {key: _quartiles([a / b for a, b in zip(rates[key], rates["default"])]) for key in keys}
    cpu_ratio = {key: _quartiles([b / a for a, b in zip(costs[key], costs["default"])]) for key in keys}
    cores = min(WORKERS + 1, os.cpu_count() or 1)
    return {
        "samples_per_s": {key: statistics.median(v) for key, v in rates.items()},
        "per_epoch_samples_per_s": rates,
        "ratio_to_default": {key: v["median"] for key, v in wall_ratio.items()},
        "ratio_to_default_quartiles": wall_ratio,
        "cpu_us_per_sample": {key: 1e6 * statistics.median(v) for key, v in costs.items()},
        "cpu_us_per_sample_main_workers": {  # where the CPU time goes: main process vs worker processes
            key: [1e6 * statistics.median(e["main_cpu"] / e["samples"] for e in values),
                  1e6 * statistics.median(e["worker_cpu"] / e["samples"] for e in values)]
            for key, values in stats.items()},
        "per_epoch_cpu_us_per_sample": {key: [1e6 * c for c in v] for key, v in costs.items()},
        # a CPU-bound loader on `cores` free cores delivers cores / cost samples/s
        "cpu_bound_samples_per_s": {key: cores / statistics.median(v) for key, v in costs.items()},
        "cpu_ratio_to_default": {key: v["median"] for key, v in cpu_ratio.items()},
        "cpu_ratio_to_default_quartiles": cpu_ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help="measured rounds (one epoch of every loader each; default 15)")
    parser.add_argument("--quick", action="store_true", help="5 measured rounds")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 15)
    torch.set_num_threads(1)
    started = time.perf_counter()
    bank = make_bank()
    collates = {"default": default_collate, "mixup": MixUpCollate(),
                "cmda": CMDACollate(bank, target="label", num_classes=NUM_CLASSES, seed=0),
                "cmda_top8": CMDACollate(bank, target="label", num_classes=NUM_CLASSES, seed=0, top_k=8)}
    results = {}
    verdicts = {}
    for name, dataset in (("cifar", CifarLike()), ("tensors", TensorImages())):
        results[name] = r = run_dataset(name, dataset, collates, rounds)
        print(f"[{name}] {rounds} rounds: median samples/s (wall clock), median paired ratio [quartiles] | "
              f"CPU us per sample (main + workers), median paired ratio [quartiles]")
        for key in collates:
            w, c = r["ratio_to_default_quartiles"][key], r["cpu_ratio_to_default_quartiles"][key]
            print(f"  {key:10s} {r['samples_per_s'][key]:8.0f}/s {w['median']:5.2f}x [{w['q1']:.2f}-{w['q3']:.2f}]"
                  f"  | {r['cpu_us_per_sample'][key]:6.1f} us {c['median']:5.2f}x [{c['q1']:.2f}-{c['q3']:.2f}]")
        wall, cpu = r["ratio_to_default"]["cmda"], r["cpu_ratio_to_default"]["cmda"]
        verdicts[name] = {"wall_ratio": wall, "cpu_ratio": cpu,
                          "wall_quartiles": r["ratio_to_default_quartiles"]["cmda"],
                          "verdict": "PASS" if wall >= TARGET else "FAIL",
                          "cpu_verdict": "PASS" if cpu >= TARGET else "FAIL"}
        print(f"  target cmda >= {TARGET}x default: samples/s {wall:.2f}x -> {verdicts[name]['verdict']}"
              f" (CPU time {cpu:.2f}x -> {verdicts[name]['cpu_verdict']})")
    ratio = min(v["wall_ratio"] for v in verdicts.values())
    verdict = "PASS" if all(v["verdict"] == "PASS" for v in verdicts.values()) else "FAIL"
    print(f"verdict (samples/s, worst dataset {ratio:.2f}x): {verdict}")
    record = {
        "benchmark": "bench_loader",
        "config": {"samples": N, "batch_size": BATCH, "num_workers": WORKERS, "persistent_workers": True,
                   "image": [3, 32, 32], "text_dim": TEXT_DIM, "latent_dim": LATENT_DIM, "gmm_components": 2,
                   "rounds_measured": rounds, "cmda": {"p": 0.5, "top_k": None, "intra": "soft"}},
        "results": results,
        "target": {"metric": "cmda / default_collate samples/s (wall clock; median of per-round paired ratios), "
                             "worst of the two datasets (CPU-time ratios reported too)",
                   "threshold": TARGET, "value": ratio, "verdict": verdict,
                   "per_dataset": verdicts},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
