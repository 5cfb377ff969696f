"""Unsupervised anomaly detection with SSD: Base / Mixup / CMDA / CMDA (offline) (paper Table I).

Normal = 3 classes (Wikipedia: royalty, sport, warfare, the paper's 921 pairs; Web News:
economy, people's livelihood, sports, the split of equal share), anomalies = the other 7
classes, the positive class. The detector trains on the normal pairs of the official train
split and is tested on the test split's normals and anomalies
(:func:`cmda_data.datasets.anomaly_split`, ``variant="split"``).

SSD (Sehwag et al. 2021) as the CMDA code runs it: the student encoder (MLP trunk
``in-512-ReLU-512`` + head ``512-256-ReLU-128``, L2-normalised) is trained with NT-Xent (code
parity: SupCon loss, tau 0.5, x tau/0.07) on two views ``x + N(0, sigma^2)`` of the z-scored
features (the code's text-student views; sigma = 1 as the code), then the trunk features
are scored with :func:`ssd.ssd_evaluate` (squared Mahalanobis, pinv covariance). AUROC and
AUPR after every epoch; the reported figure is the LAST epoch.

* ``mixup``: + NT-Xent(g(lambda v1 + (1 - lambda) v1[perm]), g(v2)), lambda ~ Beta(0.25, 0.25),
  the larger share on the own sample.
* ``cmda``: the student encoder is the aligner's student branch; L = L_SSD + 0.1 Eq.7 (Eq. 9)
  + NT-Xent(g(x_new), g(v2)) with x_new = CMDAugment(aligner=view 1) (weights from the current latents,
  GMM M = 2 refitted each epoch on the language latents).
* ``cmda_offline``: aligner trained first with Eq. 7 (30 epochs), EmbeddingBank, CMDACollate
  mixes the raw features, the mixed sample gets its own noise view.

Result file: ``metric`` = ``"auroc"`` with ``methods``; ``metrics.aupr`` holds the AUPR records.
Run: ``python benchmarks/anomaly_ssd.py --dataset all --student all`` (``--quick``, ``--smoke``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import _tasks as T  # noqa: E402
import ssd  # noqa: E402

from cmda_data.augment.dataset import IndexedDataset  # noqa: E402
from cmda_data.core.losses import supcon_loss  # noqa: E402
from cmda_data.datasets import WEBNEWS_NORMAL_CLASSES, WIKIPEDIA_NORMAL_CLASSES, anomaly_split  # noqa: E402

METHODS = ("base", "base_matched", "mixup", "cmda", "cmda_offline", "random_teacher", "random_teacher_offline",
           "shuffled_teacher_offline")
CONTROLS = ("shuffled_teacher",)  # run on request (--methods shuffled_teacher --add)
NORMAL = {"wikipedia": WIKIPEDIA_NORMAL_CLASSES, "webnews": WEBNEWS_NORMAL_CLASSES}
MIXUP_ALPHA = 0.25
LAMBDA = 0.1


def prepare(dataset: str, *, study: bool = False, normal: Optional[List[int]] = None,
            all_abnormal: bool = False) -> Dict[str, Any]:
    """Train normals and the test set (``study``: 20 % of the train normals + the train-split
    anomalies, which the test never uses, as a validation set).

    ``normal``: the normal classes (default: the paper's set). ``all_abnormal``: also score
    the paper's test set (the test normals and every anomaly of both splits) as
    ``auroc_all_abnormal`` / ``aupr_all_abnormal``.
    """
    table = T.load_table(dataset)
    normal = normal_list = list(NORMAL[dataset] if normal is None else normal)
    parts = anomaly_split(table.labels.numpy(), normal, table.is_train.numpy(), variant="split")
    train_rows, test_rows, target = parts["train_normal"], parts["test"], parts["test_target"]
    extra = {}
    if all_abnormal and not study:
        wide = anomaly_split(table.labels.numpy(), normal, table.is_train.numpy(), variant="all_abnormal")
        extra["all_abnormal"] = {"x": T.columns(table, wide["test"], train_rows), "target": wide["test_target"]}
    if study:
        gen = torch.Generator().manual_seed(0)
        order = torch.randperm(len(train_rows), generator=gen).numpy()
        cut = len(train_rows) // 5
        val_normal, train_rows = np.sort(train_rows[order[:cut]]), np.sort(train_rows[order[cut:]])
        normal = np.isin(table.labels.numpy(), normal)
        val_anomaly = np.flatnonzero(~normal & table.is_train.numpy())
        test_rows = np.concatenate([val_normal, val_anomaly])
        target = np.concatenate([np.zeros(len(val_normal), np.int64), np.ones(len(val_anomaly), np.int64)])
    sizes = {"train_normal": int(len(train_rows)), "test_normal": int((target == 0).sum()),
             "test_anomaly": int((target == 1).sum())}
    if extra:
        sizes["all_abnormal_test_anomaly"] = int((extra["all_abnormal"]["target"] == 1).sum())
    return {"train": T.columns(table, train_rows, train_rows), "test": T.columns(table, test_rows, train_rows),
            "target": target, "extra_tests": extra, "sizes": sizes,
            "class_names": [table.class_names[c] if c < len(table.class_names) else str(c) for c in normal_list]}


def normal_classes(args: argparse.Namespace, dataset: str) -> List[int]:
    """``--normal`` as a sorted list of class ids (default: the paper's normal set)."""
    if not args.normal:
        return list(NORMAL[dataset])
    try:
        return sorted({int(c) for c in args.normal.split(",")})
    except ValueError:
        raise SystemExit(f"--normal: expected comma-separated class ids such as 0,3,7, got {args.normal!r}")


def trunk_for(in_dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, 512), nn.ReLU(), nn.Linear(512, 512))


def ntxent(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return supcon_loss([a, b], tau=0.5, base_temperature=0.07)


def run_one(method: str, data: Dict[str, Any], student: str, seed: int, epochs: int, cfg: T.MixConfig,
            device: torch.device, *, sigma: float = 1.0, batch_size: int = 128,
            aligner_epochs: int = 30) -> Dict[str, List[float]]:
    """Train one SSD student; return AUROC and AUPR after every epoch.

    The generated views add a second NT-Xent term at weight 1, so the real views weigh the
    same in every method (``base_matched`` is ``base``).
    """
    pipeline, control = T.method_parts(method)
    train, test = data["train"], data["test"]
    teacher = T.other(student)
    gen = C.generator(seed, 3)
    trunk = trunk_for(train[student].shape[1], seed)
    aligner = T.make_aligner(student, trunk, 512, train[teacher].shape[1], loss="eq7", seed=seed).to(device)
    cols = {"image": train["image"], "text": train["text"], "label": train["label"]}
    dataset = IndexedDataset(T.ColumnDataset(cols))
    augment = collate = mixing_aligner = None
    if pipeline == "offline":
        off = T.fit_offline_aligner(cols, student, loss="eq7", epochs=aligner_epochs, seed=seed)
        bank = T.control_bank(T.build_bank(off, dataset, student, cfg, seed), control, seed)
        collate = T.RealAndMixed(T.make_collate(bank, cfg, num_classes=None, seed=seed, target=None))
    elif pipeline == "online":  # a teacher control changes only the latents the mixing sees
        mixing_aligner = T.control_aligner(aligner, control, student, seed)
        augment = T.make_augment(mixing_aligner, student, cfg, num_classes=None, seed=seed, target=None)
    opt = torch.optim.SGD(aligner.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=C.generator(seed, 4),
                        collate_fn=collate)
    rng = np.random.default_rng(seed)
    noise = lambda x: x + sigma * torch.randn(x.shape, generator=gen).to(x.device)  # noqa: E731
    extra_tests = data.get("extra_tests", {})
    curves: Dict[str, List[float]] = {"auroc": [], "aupr": [],
                                      **{f"{m}_{name}": [] for name in extra_tests for m in ("auroc", "aupr")}}
    for epoch in range(epochs):
        if collate is not None:
            collate.cmda.set_epoch(epoch)
        if augment is not None:
            augment.set_epoch(epoch)
            augment.gmm = T.refit_gmm(mixing_aligner, train["text"], cfg, seed + epoch, device)
        aligner.train()
        for batch in loader:
            mixed = None
            if collate is not None:
                batch, mixed = batch
            x = batch[student]
            if len(x) < 2:
                continue
            v1, v2 = noise(x).to(device), noise(x).to(device)
            z2 = aligner(student, v2)
            loss = ntxent(aligner(student, v1), z2)
            x_new = None
            if method == "mixup":
                lam = float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))
                lam = max(lam, 1 - lam)
                perm = torch.randperm(len(v1), generator=gen).to(device)
                x_new = lam * v1 + (1 - lam) * v1[perm]
            elif augment is not None:
                out, _ = augment({student: v1, teacher: batch[teacher].to(device), "index": batch["index"].to(device)})
                x_new = out[student]
            elif mixed is not None:
                x_new = noise(mixed[student]).to(device)
            if x_new is not None:
                loss = loss + ntxent(aligner(student, x_new), z2)
            if pipeline == "online":
                loss = aligner.joint_loss(loss, {student: v1, teacher: batch[teacher].to(device)}, lam=LAMBDA)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        result = evaluate(trunk, train[student], test[student], data["target"], device)
        curves["auroc"].append(result["auroc"])
        curves["aupr"].append(result["aupr"])
        for name, extra in extra_tests.items():
            result = evaluate(trunk, train[student], extra["x"][student], extra["target"], device)
            curves[f"auroc_{name}"].append(result["auroc"])
            curves[f"aupr_{name}"].append(result["aupr"])
    return curves


@torch.no_grad()
def evaluate(trunk: nn.Module, train_x: torch.Tensor, test_x: torch.Tensor, target: np.ndarray,
             device: torch.device) -> Dict[str, float]:
    trunk.eval()
    feats = [torch.cat([trunk(c.to(device)).cpu() for c in x.split(512)]) for x in (train_x, test_x)]
    trunk.train()
    return ssd.ssd_evaluate(feats[0], feats[1], target)


def study_path(out: Path, dataset: str, student: str, quick: bool = False) -> Path:
    return Path(out) / f"study-anomaly-{dataset}-{student}{'-quick' if quick else ''}.json"


def _task(data: Dict[str, Any], method: str, cfg: Dict[str, Any], seed: int,
          spec: Dict[str, Any]) -> Dict[str, List[float]]:
    """One (method, configuration, seed) SSD run (in a worker process with ``--jobs``)."""
    return run_one(method, data, spec["student"], seed, spec["epochs"], T.MixConfig(**cfg),
                   torch.device(spec["device"]), sigma=spec["sigma"], aligner_epochs=spec["aligner_epochs"])


def run_tasks(args: argparse.Namespace, dataset: str, student: str, study: bool, data: Dict[str, Any],
              tasks: List[tuple], *, desc: str) -> Dict[tuple, Dict[str, List[float]]]:
    """``{(name, seed): {"auroc": curve, "aupr": curve}}`` for ``tasks = [(name, method, cfg, seed)]``."""
    spec = {"student": student, "epochs": args.epochs, "device": str(args.device), "sigma": args.sigma,
            "aligner_epochs": args.aligner_epochs}
    results = C.run_grid(_task, [(method, cfg, seed, spec) for _, method, cfg, seed in tasks], data=data,
                         prepare=prepare, prepare_kwargs={"dataset": dataset, "study": study,
                                                          "normal": normal_classes(args, dataset),
                                                          "all_abnormal": args.all_abnormal and not study},
                         jobs=args.jobs,
                         desc=desc, enabled=not args.no_progress)
    return {(tasks[i][0], tasks[i][3]): dict(r["value"], seconds=r["seconds"]) for i, r in results.items()}


def run_study(args: argparse.Namespace, dataset: str, student: str) -> Path:
    """Validation study of the CMDA choices (online CMDA), with base and mixup as references."""
    data = prepare(dataset, study=True, normal=normal_classes(args, dataset))
    seeds = list(range(args.study_seeds))
    grid = T.STUDY_GRID[:3] if args.smoke else T.STUDY_GRID
    tasks = [(cfg.label(), "cmda", cfg.as_dict(), s) for s in seeds for cfg in grid]
    tasks += [(name, name, T.FAITHFUL.as_dict(), s) for s in seeds for name in ("base", "mixup")]
    done = run_tasks(args, dataset, student, True, data, tasks, desc=f"study {dataset}/{student}")

    def summary(name: str) -> Dict[str, Any]:
        last = [done[(name, s)]["auroc"][-1] for s in seeds]
        mean, ci = C.mean_ci95(last)
        return {"val_auroc": mean, "ci95": ci, "per_seed": last}

    references = {name: summary(name) for name in ("base", "mixup")}
    rows = [{"config": cfg.as_dict(), "label": cfg.label(), **summary(cfg.label())} for cfg in grid]
    for name, rec in [*references.items(), *((r["label"], r) for r in rows)]:
        print(f"  {dataset}/{student} {name:28s} val AUROC {100 * rec['val_auroc']:.2f} ± {100 * rec['ci95']:.2f}",
              flush=True)
    payload = {"task": "anomaly", "dataset": dataset, "student": student, "split": "validation",
               "validation": "20% of the train normals + the train-split anomalies (unused by the test)",
               "method": "cmda", "seeds": seeds, "epochs": args.epochs, "rows": rows,
               "best": max(rows, key=lambda r: r["val_auroc"]), "references": references}
    path = study_path(Path(args.out), dataset, student, args.quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def run_benchmark(args: argparse.Namespace, dataset: str, student: str) -> Path:
    normal = normal_classes(args, dataset)
    data = prepare(dataset, normal=normal, all_abnormal=args.all_abnormal)
    seeds = list(range(args.seeds))
    suffix = "-".join(p for p in ("normal-" + "-".join(map(str, normal)) if args.normal else "", args.tag) if p)
    path = C.result_path(args.out, "anomaly", dataset, student, suffix, quick=args.quick)
    plan = [] if args.add_tuned else [(m, T.FAITHFUL) for m in args.methods]
    sp = study_path(Path(args.out), dataset, student, args.quick)
    if sp.is_file() and not args.no_tuned:
        tuned = T.MixConfig(**json.loads(sp.read_text())["best"]["config"])
        plan += [(m + "_tuned", tuned) for m in args.methods if m.startswith("cmda")]
    if args.add and not path.is_file():
        raise SystemExit(f"--add: expected an existing result file {path} to add {args.methods} to")
    previous = json.loads(path.read_text()) if (args.add_tuned or args.add) and path.is_file() else None
    if previous is not None and (previous["seeds"], previous["epochs"]) != (seeds, args.epochs):
        raise SystemExit(f"--add/--add-tuned: expected the seeds and epochs of {path} ({previous['seeds']}, "
                         f"{previous['epochs']}), got {seeds}, {args.epochs}")
    if args.add:
        plan = [(name, cfg) for name, cfg in plan if not name.endswith("_tuned")]
    # the real views weigh 1 in every method: base_matched is base (not rerun)
    alias = "base_matched" in dict(plan) and ("base" in dict(plan) or previous is not None)
    plan = [(name, cfg) for name, cfg in plan if name != "base_matched"]
    auroc: Dict[str, Any] = dict(previous["methods"]) if previous else {}
    aupr: Dict[str, Any] = dict(previous["metrics"]["aupr"]) if previous else {}
    extra_metrics = [f"{m}_all_abnormal" for m in ("auroc", "aupr")] if args.all_abnormal else []
    if previous is not None and any(m not in previous.get("metrics", {}) for m in extra_metrics):
        raise SystemExit(f"--add: {path} has no all_abnormal metrics; run it again with --all-abnormal")
    extra: Dict[str, Dict[str, Any]] = {m: dict(previous["metrics"][m]) if previous else {} for m in extra_metrics}
    configs = dict(previous.get("cmda_configs", {})) if previous else {}
    timings = dict(previous.get("seconds", {})) if previous else {}
    tasks = [(name, name.replace("_tuned", ""), cfg.as_dict(), s) for s in seeds for name, cfg in plan]
    done = run_tasks(args, dataset, student, False, data, tasks, desc=f"{dataset}/{student}")
    for name, cfg in plan:
        runs = [done[(name, s)] for s in seeds]
        auroc[name] = C.summarise_method([r["auroc"] for r in runs])
        aupr[name] = C.summarise_method([r["aupr"] for r in runs])
        for metric in extra_metrics:
            extra[metric][name] = C.summarise_method([r[metric] for r in runs])
        if T.method_parts(name)[0] in ("online", "offline"):
            configs[name] = cfg.as_dict()
        timings[name] = round(sum(r["seconds"] for r in runs), 1)
        print(f"  {dataset}/{student} {name:20s} AUROC {100 * auroc[name]['mean']:.2f} ± {100 * auroc[name]['ci95']:.2f}"
              f"  AUPR {100 * aupr[name]['mean']:.2f} ± {100 * aupr[name]['ci95']:.2f} ({timings[name]} s)", flush=True)
    if alias:
        note = "the generated views add a separate term at weight 1: the real views weigh 1 in every method"
        auroc["base_matched"] = dict(auroc["base"], identical_to="base", note=note)
        aupr["base_matched"] = dict(aupr["base"], identical_to="base", note=note)
        for metric in extra_metrics:
            extra[metric]["base_matched"] = dict(extra[metric]["base"], identical_to="base", note=note)
        timings["base_matched"] = 0.0
    payload = {
        "task": "anomaly", "dataset": dataset, "student": student, "teacher": T.other(student),
        "student_features": T.FEATURE_NAMES[dataset][student],
        "teacher_features": T.FEATURE_NAMES[dataset][T.other(student)],
        "normal_classes": normal, "normal_class_names": data["class_names"], "split": data["sizes"],
        "metric": "auroc", "quick": bool(args.quick), "seeds": seeds, "epochs": args.epochs,
        "aligner_epochs": args.aligner_epochs, "loss_form": "sum",
        "loss": "L_SSD(real views) + L_SSD(generated view, second real view) at weight 1",
        "methods": auroc, "metrics": {"aupr": aupr, **extra}, "cmda_configs": configs, "seconds": timings,
        "ssd": {"clusters": 1, "features": "trunk output (before the projection head)", "view_noise_sigma": args.sigma},
        "protocol": "last epoch on the test split; anomalies positive; AUPR = average precision (AUPR-Out); "
                    "tuned configs chosen on a validation split (see the study file)",
    }
    C.write_result(path, payload, plot=not args.no_plot)
    return path


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="all", choices=(*T.DATASETS, "all"))
    parser.add_argument("--student", default="all", choices=(*T.STUDENTS, "all"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=(*METHODS, *CONTROLS))
    parser.add_argument("--add", action="store_true",
                        help="run --methods (e.g. the teacher controls) and merge them into the existing result file")
    parser.add_argument("--sigma", type=float, default=1.0, help="std of the Gaussian noise views")
    parser.add_argument("--normal", default=None,
                        help="the normal classes, comma-separated ids (default: the paper's set); the result file "
                             "is named ...-normal-<ids>")
    parser.add_argument("--all-abnormal", action="store_true",
                        help="also score the paper's test set (every anomaly of both splits): "
                             "auroc_all_abnormal / aupr_all_abnormal")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--study", action="store_true", help="validation study of the CMDA choices")
    parser.add_argument("--study-seeds", type=int, default=2)
    parser.add_argument("--no-tuned", action="store_true", help="skip the *_tuned methods")
    parser.add_argument("--add-tuned", action="store_true",
                        help="only run the *_tuned methods and merge them into the existing result file")
    parser.add_argument("--jobs", type=int, default=1, help="runs (method x seed) in parallel processes")
    parser.add_argument("--aligner-epochs", type=int, default=None,
                        help="offline aligner epochs (default 30; quick 10; smoke 2)")
    C.add_common_args(parser, default_epochs=40)
    args = parser.parse_args(argv)
    C.env_threads()
    C.resolve_preset(args, default_epochs=40, quick_epochs=10, smoke_epochs=2)
    args.aligner_epochs = args.aligner_epochs or (2 if args.smoke else 10 if args.quick else 30)
    args.device = C.resolve_device(args.device)
    for dataset in (T.DATASETS if args.dataset == "all" else (args.dataset,)):
        for student in (T.STUDENTS if args.student == "all" else (args.student,)):
            path = run_study(args, dataset, student) if args.study else run_benchmark(args, dataset, student)
            print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
