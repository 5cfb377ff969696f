"""What online CMDA adds to a training step, against a Mixup step, in the same run.

The online setting of ``classification.py`` (Eq. 9): a ResNet-18 trunk is the aligner's
student encoder, :class:`~cmda_data.CMDAugment` mixes every batch with weights from the
current latents (one no-grad trunk forward to embed the batch, the Eq. 11 GMM on the
language latents), and the loss adds ``0.1 * L_align``. Timed interleaved, medians over
``--steps`` rounds after 2 warm-up rounds (``torch.cuda.synchronize`` around each call on a
GPU):

* ``mixup_step``: forward + backward + SGD on the real batch plus a Mixup batch (2B rows);
* ``augment``: one ``CMDAugment`` call alone (embed, plan, mix);
* ``cmda_step``: ``augment`` + forward + backward + SGD on real + generated rows with the
  joint loss (what the online ``cmda`` method of the benchmarks does per batch).

It also counts the host reads of tensor values in one ``augment`` call (each one waits for
the device on a GPU). Synthetic inputs (random photos and caption vectors): only the time is
measured. Writes ``results/bench_online[-cuda].json``.

Run: ``python benchmarks/bench_online.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _host_reads import HostReads  # noqa: E402

from cmda_data import CMDAugment  # noqa: E402
from cmda_data.aligners import ContrastiveAligner  # noqa: E402
from cmda_data.core.mixture import GaussianMixture  # noqa: E402

NUM_CLASSES = 10
TEXT_DIM = 384


def build(device: torch.device, size: int, batch: int, seed: int = 0):
    from torchvision.models import resnet18

    torch.manual_seed(seed)  # module init only
    trunk = resnet18(weights=None)
    trunk.fc = nn.Identity()
    classifier = nn.Linear(512, NUM_CLASSES)
    aligner = ContrastiveAligner({"image": trunk, "text": nn.Identity()}, dim=128, loss="eq8", head_hidden=(256,),
                                 in_features={"image": 512, "text": TEXT_DIM}, seed=seed)
    aligner.to(device), classifier.to(device)
    gen = torch.Generator().manual_seed(seed)
    data = {"image": torch.rand(batch, 3, size, size, generator=gen).to(device),
            "text": torch.randn(batch, TEXT_DIM, generator=gen).to(device),
            "label": torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device),
            "index": torch.arange(batch, device=device)}
    with torch.no_grad():
        text_z = aligner.embed("text", torch.randn(4 * batch, TEXT_DIM, generator=gen).to(device))
    gmm = GaussianMixture(2, covariance_type="diag", reg_covar=1e-4, random_state=seed).fit(text_z)
    augment = CMDAugment(aligner=aligner, gmm=gmm, student="image", teachers="text", target="label",
                         num_classes=NUM_CLASSES, seed=seed)
    params = list(aligner.parameters()) + list(classifier.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return trunk, classifier, aligner, augment, opt, data


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * torch.log_softmax(logits, 1)).sum(1).mean()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128 on a GPU, 32 on a CPU)")
    parser.add_argument("--size", type=int, default=64, help="photo size")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device: expected an available device, got {args.device!r} (no CUDA here)")
    batch = args.batch or (128 if device.type == "cuda" else 32)
    trunk, classifier, aligner, augment, opt, data = build(device, args.size, batch)
    onehot = nn.functional.one_hot(data["label"], NUM_CLASSES).float()
    gen = torch.Generator().manual_seed(1)

    def mixup_step() -> None:
        lam = float(torch.distributions.Beta(0.25, 0.25).sample())
        perm = torch.randperm(batch, generator=gen).to(device)
        x = torch.cat([data["image"], lam * data["image"] + (1 - lam) * data["image"][perm]])
        y = torch.cat([onehot, lam * onehot + (1 - lam) * onehot[perm]])
        loss = soft_ce(classifier(trunk(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def augment_only() -> None:
        augment(data)

    def cmda_step() -> None:
        out, _ = augment(data)
        x = torch.cat([data["image"], out["image"]])
        y = torch.cat([onehot, out["label"]])
        loss = aligner.joint_loss(soft_ce(classifier(trunk(x)), y), data, lam=0.1, target="label")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fns = {"mixup_step": mixup_step, "augment": augment_only, "cmda_step": cmda_step}
    for _ in range(2):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(args.steps):
        for key, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - start)
    with HostReads() as reads:
        augment(data)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratios = {"augment/mixup_step": med["augment"] / med["mixup_step"],
              "cmda_step/mixup_step": med["cmda_step"] / med["mixup_step"]}
    print(f"batch {batch} photos of 3x{args.size}x{args.size}, ResNet-18, {device}, median of {args.steps} (ms)")
    for key, value in med.items():
        print(f"  {key:<12} {value:9.2f}")
    for key, value in ratios.items():
        print(f"  {key:<22} {value:6.2f}")
    print(f"  host reads per CMDAugment call: {reads.count}")
    payload = {"benchmark": "bench_online", "device": str(device), "batch": batch, "size": args.size,
               "steps": args.steps, "median_ms": med, "ratios": ratios, "host_reads_per_augment": reads.count,
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(),
                           "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None}}
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_online{'-cuda' if device.type == 'cuda' else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
