"""Throughput of a DataLoader: CMDACollate and CrossModalAugmentedDataset vs default_collate alone (and MixUp).

Same dataset, same loader settings (2 worker processes, persistent, shuffled, 4096 samples of
a 3x32x32 image, a 384-d text embedding and a label). Two batch sizes:

* **B = 64**: ``default``, ``mixup``, ``cmda``, ``cmda_dense`` (below);
* **B = 256**: ``default``, ``cmda``, ``dataset`` and ``dataset_shuffle`` (the
  sample-level entry point, the same default options, collated with ``default_collate``).

The loaders of one batch size run interleaved: each *round* runs one epoch of every loader,
back to back, in an order that rotates from round to round (so a drift of a shared machine,
or being first after a pause, hits every loader alike); one warm-up round first.

Two datasets:

* ``cifar`` (the target): images stored as uint8 HWC arrays, converted to float CHW and
  augmented per sample (random crop with 4-pixel padding, horizontal flip) in
  ``__getitem__``, as a CIFAR training pipeline does.
* ``tensors`` (worst case, reported): images already float tensors, ``__getitem__`` only
  indexes them, so the loader does almost nothing besides the collate.

Loaders:

* ``default``    -- ``torch.utils.data.default_collate``;
* ``mixup``      -- ``default_collate`` then ``torchvision.transforms.v2.MixUp(num_classes=10)``;
* ``cmda``       -- ``CMDACollate(bank, target="label", num_classes=10)`` with the default
  ``MixOptions()`` (p=0.5, top_k=8, soft Eq. 11 weights, the whole batch as pool) from a bank
  of random unit 128-d embeddings with a GMM of M=2 fitted on the teacher's;
* ``cmda_dense`` -- the same with ``top_k=None`` (every sample of the batch, dense mixing);
* ``dataset``    -- ``CrossModalAugmentedDataset(dataset, bank, target="label", num_classes=10)``
  with the same default options (a pool of 32 random samples per item, ``top_k=8``),
  ``default_collate``, loaded with its ``sampler()`` (the epoch's random order, in which a
  batch holds its items' partners: each sample is read once);
* ``dataset_shuffle`` -- the same wrapper loaded with ``shuffle=True`` instead (any other
  sampler): each mixed item reads its partners from the wrapped dataset, about 4 reads per
  item (reported, not a target).

Two figures per loader:

* **samples/s (wall clock)** -- the issue's metric. Per round, the ratio of a loader's
  samples/s to its *reference*'s in the same round (paired: the two epochs ran seconds apart);
  the figure is the median of these per-round ratios (with the lower / upper quartile),
  beside the median samples/s of each loader. The reference is ``default`` for every loader
  except ``dataset`` and ``dataset_shuffle``, whose reference is ``cmda`` (the JSON's
  ``ratio_reference`` says so).
* **CPU time per sample** (main process + workers, from ``/proc``): what a CPU-bound loader
  on free cores would deliver; much less sensitive to other jobs on the machine than the
  wall clock. Also reported as the median of per-round paired ratios, same references.

Targets (samples/s, median paired ratio, both datasets): ``cmda`` >= 0.8x ``default`` at
B = 256 (and at B = 64, reported), ``dataset`` >= 0.5x ``cmda`` at B = 256. On a loaded
machine the wall-clock quartiles are wide: read them before trusting a single figure.
Between runs a few minutes apart the load of a shared machine can move the ratios by 0.2 or
more: run it more than once.

Usage::

    python benchmarks/bench_loader.py            # 15 rounds, a few minutes on 2 cores
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

from cmda_data.augment.collate import CMDACollate  # noqa: E402
from cmda_data.augment.dataset import CrossModalAugmentedDataset, IndexedDataset  # noqa: E402
from cmda_data.bank import EmbeddingBank  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_loader.json"
N, WORKERS, NUM_CLASSES, TEXT_DIM, LATENT_DIM = 4096, 2, 10, 384, 128
TARGET = 0.8  # cmda / default at B = 256
DATASET_TARGET = 0.5  # dataset / cmda at B = 256
#: each loader's ratios are to this loader's, measured in the same round
REFERENCE = {"default": "default", "mixup": "default", "cmda": "default", "cmda_dense": "default",
             "dataset": "cmda", "dataset_shuffle": "cmda"}


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
        seen += len(batch["label"])
    return {"samples": seen, "wall": time.perf_counter() - wall, "main_cpu": time.process_time() - main_cpu,
            "worker_cpu": _worker_cpu(loader) - worker_cpu}


def _quartiles(values: List[float]) -> Dict[str, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3}


def make_loaders(dataset: Dataset, bank: EmbeddingBank, keys: List[str], batch: int) -> Dict[str, Any]:
    """key -> (loader, the object whose set_epoch starts a round, or None)."""
    common = dict(target="label", num_classes=NUM_CLASSES, seed=0)  # default MixOptions otherwise
    out = {}
    for key in keys:
        source, collate, epochs, sampler = IndexedDataset(dataset), default_collate, None, None
        if key == "mixup":
            collate = MixUpCollate()
        elif key in ("cmda", "cmda_dense"):
            collate = epochs = CMDACollate(bank, **common, **({"top_k": None} if key == "cmda_dense" else {}))
        elif key in ("dataset", "dataset_shuffle"):
            source = epochs = CrossModalAugmentedDataset(dataset, bank, **common)
            sampler = source.sampler() if key == "dataset" else None
        loader = DataLoader(source, batch_size=batch, shuffle=sampler is None, sampler=sampler, num_workers=WORKERS,
                            persistent_workers=True, collate_fn=collate, generator=torch.Generator().manual_seed(0))
        out[key] = (loader, epochs)
    return out


def run_case(dataset: Dataset, bank: EmbeddingBank, keys: List[str], batch: int, rounds: int) -> Dict[str, Any]:
    loaders = make_loaders(dataset, bank, keys, batch)
    stats: Dict[str, List[Dict[str, float]]] = {key: [] for key in keys}
    for loader, _ in loaders.values():  # warm-up: start the workers, fill caches
        epoch_stats(loader)
    for r in range(rounds):  # interleaved, order rotated every round
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            loader, epochs = loaders[key]
            if epochs is not None:
                epochs.set_epoch(r + 1)
            stats[key].append(epoch_stats(loader))
    del loaders
    rates = {key: [e["samples"] / e["wall"] for e in values] for key, values in stats.items()}
    costs = {key: [(e["main_cpu"] + e["worker_cpu"]) / e["samples"] for e in values] for key, values in stats.items()}
    reference = {key: REFERENCE[key] for key in keys}
    wall_ratio = {key: _quartiles([a / b for a, b in zip(rates[key], rates[reference[key]])]) for key in keys}
    cpu_ratio = {key: _quartiles([b / a for a, b in zip(costs[key], costs[reference[key]])]) for key in keys}
    cores = min(WORKERS + 1, os.cpu_count() or 1)
    record = {
        "batch_size": batch,
        "samples_per_s": {key: statistics.median(v) for key, v in rates.items()},
        "per_epoch_samples_per_s": rates,
        "ratio_reference": reference,  # each ratio below is this loader's figure over its reference's
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
    for key in ("dataset", "dataset_shuffle"):  # also against default_collate, for scale
        if key in keys:
            record[f"{key}_ratio_to_default_collate"] = statistics.median(
                a / b for a, b in zip(rates[key], rates["default"]))
    return record


def _print(name: str, batch: int, rounds: int, r: Dict[str, Any]) -> None:
    print(f"[{name}, B={batch}] {rounds} rounds: median samples/s (wall clock), median paired ratio [quartiles] "
          f"to the reference | CPU us per sample (main + workers), median paired ratio [quartiles]")
    for key, ref in r["ratio_reference"].items():
        w, c = r["ratio_to_default_quartiles"][key], r["cpu_ratio_to_default_quartiles"][key]
        print(f"  {key:15s} {r['samples_per_s'][key]:8.0f}/s {w['median']:5.2f}x [{w['q1']:.2f}-{w['q3']:.2f}]"
              f" of {ref:8s} | {r['cpu_us_per_sample'][key]:6.1f} us {c['median']:5.2f}x [{c['q1']:.2f}-{c['q3']:.2f}]")


def _verdict(r: Dict[str, Any], key: str, threshold: float) -> Dict[str, Any]:
    wall, cpu = r["ratio_to_default"][key], r["cpu_ratio_to_default"][key]
    return {"wall_ratio": wall, "cpu_ratio": cpu, "wall_quartiles": r["ratio_to_default_quartiles"][key],
            "verdict": "PASS" if wall >= threshold else "FAIL", "cpu_verdict": "PASS" if cpu >= threshold else "FAIL"}


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
    cases = {64: ["default", "mixup", "cmda", "cmda_dense"], 256: ["default", "cmda", "dataset", "dataset_shuffle"]}
    results: Dict[str, Dict[str, Any]] = {}
    verdicts: Dict[str, Dict[str, Any]] = {}
    dataset_verdicts: Dict[str, Dict[str, Any]] = {}
    for name, dataset in (("cifar", CifarLike()), ("tensors", TensorImages())):
        for batch, keys in cases.items():
            r = results.setdefault(f"batch_{batch}", {})[name] = run_case(dataset, bank, keys, batch, rounds)
            _print(name, batch, rounds, r)
        r = results["batch_256"][name]
        verdicts[name] = _verdict(r, "cmda", TARGET)
        dataset_verdicts[name] = _verdict(r, "dataset", DATASET_TARGET)
        print(f"  B=256 target cmda >= {TARGET}x default: {verdicts[name]['wall_ratio']:.2f}x -> "
              f"{verdicts[name]['verdict']}; dataset >= {DATASET_TARGET}x cmda: "
              f"{dataset_verdicts[name]['wall_ratio']:.2f}x -> {dataset_verdicts[name]['verdict']}")
    targets = {}
    for key, threshold, per in (("cmda", TARGET, verdicts), ("dataset", DATASET_TARGET, dataset_verdicts)):
        targets[key] = {
            "metric": (f"{key} / {REFERENCE[key]} samples/s at B = 256 (wall clock; median of per-round paired "
                       "ratios), worst of the two datasets (CPU-time ratios reported too)"),
            "loader": key, "relative_to": REFERENCE[key], "batch_size": 256, "threshold": threshold,
            "value": min(v["wall_ratio"] for v in per.values()),
            "verdict": "PASS" if all(v["verdict"] == "PASS" for v in per.values()) else "FAIL", "per_dataset": per}
        print(f"verdict {key} >= {threshold}x {REFERENCE[key]} (B=256, worst dataset "
              f"{targets[key]['value']:.2f}x): {targets[key]['verdict']}")
    record = {
        "benchmark": "bench_loader",
        "config": {"samples": N, "batch_sizes": list(cases), "loaders": {str(b): k for b, k in cases.items()},
                   "num_workers": WORKERS, "persistent_workers": True, "image": [3, 32, 32], "text_dim": TEXT_DIM,
                   "latent_dim": LATENT_DIM, "gmm_components": 2, "rounds_measured": rounds,
                   "cmda": {"p": 0.5, "top_k": 8, "intra": "soft", "pool_size": 32, "note": "MixOptions() defaults"},
                   "cmda_dense": {"top_k": None},
                   "dataset": {"sampler": "CrossModalAugmentedDataset.sampler()", "shuffle": False},
                   "dataset_shuffle": {"sampler": None, "shuffle": True}, "ratio_reference": REFERENCE},
        "results": results,
        "targets": targets,
        "target": targets["cmda"],  # (the collate's target, as the report reads it)
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
