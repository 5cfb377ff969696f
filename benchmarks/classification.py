"""Supervised classification with Base / Mixup / CMDA / CMDA (offline) (paper Tables II and VI).

Student = the modality that is classified and augmented; teacher = the other one.

* Features (default, ``--student-space features``): Wikipedia SIFT-128 image histograms /
  all-MiniLM-L6 text embeddings, Web News EfficientNet-Lite0 / multilingual-e5-small, an MLP
  trunk (``in-512-ReLU-256-ReLU``) and a linear classifier, z-scored inputs.
* Pixels (``--student-space pixels``, Web News only): the photos at 64 px, a torchvision
  ResNet-18 trained from scratch (random crop + flip), text e5 as the teacher.

Methods (all see the same real batches; the generated batches are *added*, as the paper adds
B generated samples to the B real ones; every loss uses soft targets):

* ``base``: cross-entropy on the real batch.
* ``mixup``: + a Mixup batch (lambda ~ Beta(0.25, 0.25) as the paper, random partner).
* ``cmda``: online CMDA (Eq. 9): the student trunk is the aligner's student encoder, the loss
  is ``L_task + 0.1 * L_align`` (Eq. 8), and :class:`~cmda_data.CMDAugment` mixes every batch
  with weights from the current latents; the Eq. 11 GMM (M = 2) is refitted every epoch on
  the language latents of the train set.
* ``align``: a control, not in the default set: ``base`` plus the Eq. 9 alignment term of
  ``cmda`` (the trunk is the aligner's student encoder, ``L_task + 0.1 * L_align``), and no
  mixing. ``cmda`` minus ``align`` is what the mixing itself adds.
* ``cmda_offline``: ContrastiveAligner trained first (Eq. 8, 30 epochs), an EmbeddingBank
  (GMM with M = 2, the paper's BIC choice, on the language latents) and :class:`~cmda_data.CMDACollate`.
* ``cmda_tuned`` / ``cmda_offline_tuned``: the same with the configuration chosen on the
  validation split by ``--study`` (read from ``study-classification-<dataset>-<student>.json``;
  only a study made with the same ``--loss-form``).

Controls (in the default set; the teacher effect is a method minus its control, paired):

* ``base_matched``: Base with the real-row loss weight and the step budget of the augmented
  methods. With ``--loss-form sum`` (the default: ``CE(real) + gen_weight * CE(generated)``)
  the real rows weigh 1 in every method, so it *is* Base and is recorded as such; with
  ``--loss-form mean`` (one mean over the real and generated rows, the form of the results
  before the controls) it is trained with its loss times ``1 / (1 + p)`` = 0.5.
* ``random_teacher``: ``cmda`` with every teacher latent replaced by a random unit vector
  fixed per sample (:func:`cmda_data.controls.random_teacher` on the aligner: the mixing sees
  a useless teacher, Eq. 9 still trains with the real one).
* ``random_teacher_offline`` / ``shuffled_teacher_offline``: ``cmda_offline`` with the bank's
  teacher rows random / permuted across samples (``shuffled_teacher``, online, on request).

Model selection never looks at the test split: ``--study`` trains on train minus a
stratified 20 % validation split and scores the validation split (the grid, plus ``base`` and
``mixup`` on the same split and seeds as references).

Run: ``python benchmarks/classification.py --dataset all --student all`` (full, 5 seeds),
``--quick`` (2 seeds, few epochs), ``--study`` (validation study of the CMDA choices),
``--methods align --add`` (run the control and merge it into the existing result files).
"""

from __future__ import annotations

import argparse
import json
import os
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

from cmda_data.augment.dataset import IndexedDataset  # noqa: E402
from cmda_data.datasets import classification_split, load_webnews, validation_split  # noqa: E402

METHODS = ("base", "base_matched", "mixup", "cmda", "cmda_offline", "random_teacher", "random_teacher_offline",
           "shuffled_teacher_offline")
CONTROLS = ("align", "shuffled_teacher")  # run on request (--methods align --add)
MIXUP_ALPHA = 0.25
LAMBDA = 0.1  # Eq. 9


# ------------------------------------------------------------------------------------ models
def mlp_trunk(in_dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # module init only (nn.Linear has no generator argument)
    return nn.Sequential(nn.Linear(in_dim, 512), nn.ReLU(), nn.Dropout(0.2), nn.Linear(512, 256), nn.ReLU())


PIXEL_TRUNKS = {"resnet18": ("ResNet-18 from scratch", 512, 0.05),
                "effnet_lite0": ("EfficientNet-Lite0 (ImageNet weights), fine-tuned", 1280, 0.01)}


class PixelTrunk(nn.Module):
    """Photos in [0, 1] -> features: torchvision ResNet-18 from scratch (no pretrained weights,
    512 features; ImageNet-style stem kept, 64 px inputs give 2x2 maps at the last stage), or
    the ImageNet EfficientNet-Lite0 fine-tuned (1280 features; 224 px inputs, the size its
    "same" padding is built for)."""

    def __init__(self, seed: int, kind: str = "resnet18") -> None:
        super().__init__()
        torch.manual_seed(seed)
        if kind == "effnet_lite0":
            from encoders import efficientnet_lite0_image_encoder

            self.net = efficientnet_lite0_image_encoder(pretrained=True, trainable=True, seed=seed).backbone
            self.pool = True
        else:
            from torchvision.models import resnet18

            self.net = resnet18(weights=None)
            self.net.fc = nn.Identity()
            self.pool = False
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.net.extract_features(x).mean(dim=(2, 3)) if self.pool else self.net(x)


def augment_pixels(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Basic augmentation of the paper's Base: random crop (pad 4, reflect) + horizontal flip.

    The draws come from the CPU generator ``gen``; the crop is one gather on ``x``'s device.
    """
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2, n), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [n, 1, h, 1]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [n, 1, 1, w]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, channel, rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(3), out)


# ------------------------------------------------------------------------------------ data
def prepare(dataset: str, student: str, space: str, *, study: bool, quick_pixels: Optional[int] = None,
            image_size: int = 64, text_features: str = "default", train_frac: float = 1.0,
            select_on_val: bool = False) -> Dict[str, Any]:
    """Train / eval sets: (train, test) or, for --study, (train minus validation, validation).

    ``train_frac`` < 1 keeps a stratified share of the train split (seed 0, the same rows for
    every method and seed); ``select_on_val`` carves a stratified 20 % validation split out of
    the train rows (seed 1) on which the reported epoch is chosen.
    """
    table = T.load_table(dataset, text_features)
    labels = table.labels.numpy()
    split = classification_split(table.is_train.numpy())
    train_rows, eval_rows = split["train"], split["test"]
    if train_frac < 1.0:
        train_rows, _ = validation_split(train_rows, labels, fraction=1.0 - train_frac, seed=0)
    val_rows = None
    if study:
        train_rows, eval_rows = validation_split(train_rows, labels, fraction=0.2, seed=0)
    elif select_on_val:
        train_rows, val_rows = validation_split(train_rows, labels, fraction=0.2, seed=1)
    if space == "pixels" and quick_pixels:
        gen = torch.Generator().manual_seed(0)
        train_rows = np.sort(train_rows[torch.randperm(len(train_rows), generator=gen)[:quick_pixels].numpy()])
        eval_rows = np.sort(eval_rows[torch.randperm(len(eval_rows), generator=gen)[:quick_pixels // 2].numpy()])
    train = T.columns(table, train_rows, train_rows)
    evaluation = T.columns(table, eval_rows, train_rows)
    info = {"train_rows": train_rows, "eval_rows": eval_rows, "num_classes": table.num_classes}
    if val_rows is not None:
        info["val"], info["val_rows"] = T.columns(table, val_rows, train_rows), val_rows
    if space == "pixels":
        photos = load_webnews(split="all", image="pixels", image_size=image_size, captions=False, cache=True)
        gen_rows = lambda rows: torch.stack([photos[int(r)]["image"] for r in rows])  # noqa: E731
        info["train_features"] = train["image"]  # EfficientNet features: the offline aligner's image view
        train["image"], evaluation["image"] = gen_rows(train_rows), gen_rows(eval_rows)
    info.update(train=train, eval=evaluation)
    return info


# ------------------------------------------------------------------------------------ training
def run_one(method: str, data: Dict[str, Any], student: str, space: str, seed: int, epochs: int,
            cfg: T.MixConfig, device: torch.device, *, batch_size: int = 128,
            aligner_epochs: int = 30, loss_form: str = "sum", gen_weight: float = 1.0,
            gen_per_real: int = 1, pixel_trunk: str = "resnet18") -> Any:
    """Train one model; return the eval-set accuracy after every epoch (and, when ``data``
    has a validation split, ``(eval curve, validation curve)``).

    ``gen_per_real`` generated batches (independent draws) come with every real batch.

    ``loss_form="sum"``: ``CE(real) + gen_weight * CE(generated)``, so the real rows weigh the
    same in every method; ``"mean"``: one mean over the real and generated rows (the form of
    the earlier results: the real rows of an augmented method then weigh ``B / (B + G)``).
    """
    pipeline, control = T.method_parts(method)
    train, evaluation, num_classes = data["train"], data["eval"], data["num_classes"]
    teacher = T.other(student)
    gen = C.generator(seed, 1)
    trunk = PixelTrunk(seed, pixel_trunk) if space == "pixels" else mlp_trunk(train[student].shape[1], seed)
    width = PIXEL_TRUNKS[pixel_trunk][1] if space == "pixels" else 256
    torch.manual_seed(seed + 7)
    classifier = nn.Linear(width, num_classes)
    params = list(trunk.parameters()) + list(classifier.parameters())
    aligner = augment = collate = None
    base_cols = {"image": train["image"], "text": train["text"], "label": train["label"]}
    dataset = IndexedDataset(T.ColumnDataset(base_cols))

    mixing_aligner = None
    if pipeline == "offline":
        # latent space learned first, on the train pairs (pixels: on the photos' EfficientNet features)
        feat_cols = dict(base_cols, image=data.get("train_features", train["image"]))
        off = T.fit_offline_aligner(feat_cols, student, loss="eq8", epochs=aligner_epochs, seed=seed)
        bank = T.control_bank(T.build_bank(off, IndexedDataset(T.ColumnDataset(feat_cols)), student, cfg, seed),
                              control, seed)
        collate = T.RealAndMixed(*[T.make_collate(bank, cfg, num_classes=num_classes, seed=seed + 1000 * j)
                                   for j in range(gen_per_real)])
    elif pipeline in ("online", "align"):
        aligner = T.make_aligner(student, trunk, width, train[teacher].shape[1], loss="eq8", seed=seed)
        params = list(aligner.parameters()) + list(classifier.parameters())
        if pipeline == "online":  # the align control keeps the alignment term and mixes nothing
            # a teacher control changes only the latents the mixing sees; Eq. 9 trains as usual
            mixing_aligner = T.control_aligner(aligner, control, student, seed)
            augments = [T.make_augment(mixing_aligner, student, cfg, num_classes=num_classes, seed=seed + 1000 * j)
                        for j in range(gen_per_real)]
            augment = augments[0]
    trunk.to(device), classifier.to(device)
    if aligner is not None:
        aligner.to(device)
    lr = 0.01 if space == "features" else PIXEL_TRUNKS[pixel_trunk][2]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=C.generator(seed, 2),
                        collate_fn=collate, drop_last=False)
    rng = np.random.default_rng(seed)
    curve, val_curve = [], []
    for epoch in range(epochs):
        trunk.train(), classifier.train()
        if collate is not None:
            collate.set_epoch(epoch)
        if augment is not None:
            gmm = T.refit_gmm(mixing_aligner, train["text"], cfg, seed + epoch, device)
            for module in augments:
                module.set_epoch(epoch)
                module.gmm = gmm
        for batch in loader:
            mixed = []
            if collate is not None:
                batch, mixed = batch
                mixed = mixed if isinstance(mixed, list) else [mixed]
            x = batch[student].to(device)
            y = batch["label"].to(device)
            if space == "pixels":
                x = augment_pixels(x, gen)
            inputs, targets = [x], [nn.functional.one_hot(y, num_classes).float()]
            if method == "mixup" and len(x) > 1:
                for _ in range(gen_per_real):
                    lam = float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))
                    perm = torch.randperm(len(x), generator=gen).to(device)
                    inputs.append(lam * x + (1 - lam) * x[perm])
                    targets.append(lam * targets[0] + (1 - lam) * targets[0][perm])
            elif augment is not None and len(x) > 1:
                real = {student: x, teacher: batch[teacher].to(device), "label": y,
                        "index": batch["index"].to(device)}
                for module in augments:
                    out, _ = module(real)
                    inputs.append(out[student])
                    targets.append(out["label"])
            for part in mixed:
                xm = part[student].to(device)
                if space == "pixels":
                    xm = augment_pixels(xm, gen)
                inputs.append(xm)
                targets.append(part["label"].to(device))
            logits = classifier(trunk(torch.cat(inputs)))
            loss = T.task_loss(logits, targets, loss_form=loss_form, gen_weight=gen_weight,
                               scale=T.matched_scale(loss_form, cfg) if method == "base_matched" else 1.0)
            if aligner is not None and len(x) > 1:
                loss = aligner.joint_loss(loss, {student: x, teacher: batch[teacher].to(device), "label": y},
                                          lam=LAMBDA, target="label")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        curve.append(accuracy(trunk, classifier, evaluation[student], evaluation["label"], device))
        if "val" in data:
            val_curve.append(accuracy(trunk, classifier, data["val"][student], data["val"]["label"], device))
    return (curve, val_curve) if "val" in data else curve


@torch.no_grad()
def accuracy(trunk: nn.Module, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    trunk.eval(), classifier.eval()
    pred = torch.cat([classifier(trunk(chunk.to(device))).argmax(1).cpu() for chunk in x.split(256)])
    return float((pred == y).float().mean())


# ------------------------------------------------------------------------------------ parallel runs
def _task(data: Dict[str, Any], method: str, cfg: Dict[str, Any], seed: int, spec: Dict[str, Any]) -> List[float]:
    """One (method, configuration, seed) training run (in a worker process with ``--jobs``)."""
    return run_one(method, data, spec["student"], spec["space"], seed, spec["epochs"], T.MixConfig(**cfg),
                   torch.device(spec["device"]), aligner_epochs=spec["aligner_epochs"],
                   loss_form=spec["loss_form"], gen_weight=spec["gen_weight"], gen_per_real=spec["gen_per_real"],
                   pixel_trunk=spec.get("pixel_trunk", "resnet18"))


def run_tasks(args: argparse.Namespace, dataset: str, student: str, study: bool, data: Dict[str, Any],
              tasks: List[tuple], *, partial: Optional[Path] = None, desc: str) -> Dict[tuple, Dict[str, Any]]:
    """``{(name, seed): {"curve", "seconds"}}`` for ``tasks`` = ``[(name, method, cfg, seed)]``.

    Runs ``--jobs`` at a time (spawned processes, each preparing the data once), stops
    starting runs after ``--max-minutes``, and appends each finished run to ``partial``
    (JSON lines; ``--resume`` skips the runs found there).
    """
    spec = {"student": student, "space": args.student_space, "epochs": args.epochs,
            "aligner_epochs": args.aligner_epochs, "device": str(args.device), "loss_form": args.loss_form,
            "gen_weight": args.gen_weight, "gen_per_real": args.gen_per_real, "pixel_trunk": args.pixel_trunk}
    prepare_kwargs = {"dataset": dataset, "student": student, "space": args.student_space, "study": study,
                      "quick_pixels": args.pixel_subset, "image_size": args.image_size, **data_options(args)}
    done: Dict[tuple, Dict[str, Any]] = {}
    if partial is not None and args.resume and partial.is_file():
        for line in partial.read_text().splitlines():
            rec = json.loads(line)
            if rec["epochs"] == args.epochs and len(rec["curve"]) == args.epochs and \
                    (rec.get("loss_form", "mean"), rec.get("gen_weight", 1.0)) == (args.loss_form, args.gen_weight) \
                    and rec.get("variant", {}) == variant(args):
                done[(rec["name"], rec["seed"])] = rec
    # a finished run counts only for the same configuration (a new study changes the tuned one)
    done = {(name, seed): done[(name, seed)] for name, _, cfg, seed in tasks
            if (name, seed) in done and done[(name, seed)].get("config") == cfg}
    todo = [t for t in tasks if (t[0], t[3]) not in done]

    def record(i: int, result: Dict[str, Any]) -> None:
        name, _, cfg, seed = todo[i]
        value = result["value"]
        curve, val_curve = value if isinstance(value, tuple) else (value, None)
        rec = {"curve": curve, "val_curve": val_curve, "variant": variant(args), "seconds": result["seconds"],
               "name": name, "seed": seed,
               "epochs": args.epochs, "config": cfg, "device": str(args.device), "loss_form": args.loss_form,
               "gen_weight": args.gen_weight}
        done[(name, seed)] = rec
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            with partial.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")

    C.run_grid(_task, [(method, cfg, seed, spec) for _, method, cfg, seed in todo], data=data, prepare=prepare,
               prepare_kwargs=prepare_kwargs, jobs=args.jobs, max_minutes=args.max_minutes, on_result=record,
               desc=desc, enabled=not args.no_progress)
    return done


def complete_seeds(done: Dict[tuple, Any], names: List[str], seeds: List[int]) -> List[int]:
    """The seeds every name finished (methods are compared on the same seeds)."""
    return [s for s in seeds if all((n, s) in done for n in names)]


def data_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The :func:`prepare` options of a variant run (teacher strength, train share, selection)."""
    return {"text_features": args.text_features, "train_frac": args.train_frac, "select_on_val": args.select_on_val}


def variant(args: argparse.Namespace) -> Dict[str, Any]:
    """What makes a run differ from the committed one besides method, configuration and loss."""
    return {key: value for key, value in {**data_options(args), "gen_per_real": args.gen_per_real}.items()
            if value != {"text_features": "default", "train_frac": 1.0, "select_on_val": False,
                         "gen_per_real": 1}[key]}


def variant_parts(args: argparse.Namespace) -> List[str]:
    """File-name parts of a variant run, so that it never overwrites the committed result."""
    v = variant(args)
    return [part for part in (f"text-{v['text_features']}" if "text_features" in v else "",
                              f"frac{round(100 * v['train_frac'])}" if "train_frac" in v else "",
                              "valsel" if v.get("select_on_val") else "",
                              f"gen{v['gen_per_real']}" if "gen_per_real" in v else "",
                              f"w{args.gen_weight:g}" if args.gen_weight != 1.0 else "") if part]


def selected_on_validation(record: Dict[str, Any], val_curves: List[List[float]]) -> Dict[str, Any]:
    """The method record with each seed's result at its epoch of best validation accuracy
    (the earliest such epoch); the last-epoch figures stay under ``last_epoch``."""
    epochs = [int(np.argmax(np.asarray(v))) for v in val_curves]
    chosen = [curve[e] for curve, e in zip(record["per_seed_curves"], epochs)]
    mean, ci = C.mean_ci95(chosen)
    return dict(record, mean=mean, ci95=ci, per_seed=chosen, selected_epoch=[e + 1 for e in epochs],
                per_seed_val_curves=val_curves,
                last_epoch={"mean": record["mean"], "ci95": record["ci95"], "per_seed": record["per_seed"]})


# ------------------------------------------------------------------------------------ drivers
def study_path(out: Path, dataset: str, student: str, space: str, quick: bool = False,
               method: str = "cmda_offline") -> Path:
    """The study file of ``method``: offline studies have the plain name, online ones ``-online``."""
    suffix = ("" if space == "features" else "-pixels") + ("-online" if method == "cmda" else "") \
        + ("-quick" if quick else "")
    return Path(out) / f"study-classification-{dataset}-{student}{suffix}.json"


def run_study(args: argparse.Namespace, dataset: str, student: str) -> Path:
    """Validation study of the open CMDA choices (``--study-method``), train minus validation only."""
    data = prepare(dataset, student, args.student_space, study=True, quick_pixels=args.pixel_subset,
                   image_size=args.image_size, **data_options(args))
    seeds = list(range(args.study_seeds))
    grid = T.STUDY_GRID[:3] if args.smoke else T.STUDY_GRID
    references = [] if args.no_references else ["base", "mixup"]
    tasks = [(cfg.label(), args.study_method, cfg.as_dict(), s) for s in seeds for cfg in grid]
    tasks += [(name, name, T.FAITHFUL.as_dict(), s) for s in seeds for name in references]
    done = run_tasks(args, dataset, student, True, data, tasks, desc=f"study {dataset}/{student}")
    seeds = complete_seeds(done, [cfg.label() for cfg in grid] + references, seeds)
    if not seeds:
        raise SystemExit("--max-minutes: no seed finished for every configuration; give it more time")
    reference_rows = {}
    for name in references:  # the same validation split and seeds without CMDA: is CMDA worth it at all?
        last = [done[(name, s)]["curve"][-1] for s in seeds]
        mean, ci = C.mean_ci95(last)
        reference_rows[name] = {"val_accuracy": mean, "ci95": ci, "per_seed": last}
        print(f"  {dataset}/{student} {name:41s} val acc {100 * mean:.2f} ± {100 * ci:.2f}", flush=True)
    rows = []
    for cfg in grid:
        last = [done[(cfg.label(), s)]["curve"][-1] for s in seeds]
        mean, ci = C.mean_ci95(last)
        rows.append({"config": cfg.as_dict(), "label": cfg.label(), "val_accuracy": mean, "ci95": ci,
                     "per_seed": last})
        print(f"  {dataset}/{student} {args.study_method} {cfg.label():28s} val acc {100 * mean:.2f} ± {100 * ci:.2f}",
              flush=True)
    best = max(rows, key=lambda r: r["val_accuracy"])
    payload = {"task": "classification", "dataset": dataset, "student": student, "split": "validation",
               "method": args.study_method, "seeds": seeds, "epochs": args.epochs, "quick": bool(args.quick),
               "loss_form": args.loss_form, "gen_weight": args.gen_weight,
               "rows": rows, "best": best, "references": reference_rows}
    path = study_path(Path(args.out), dataset, student, args.student_space, args.quick, args.study_method)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def tuned_study(args: argparse.Namespace, dataset: str, student: str, method: str) -> Optional[Dict[str, Any]]:
    """The study whose pick ``<method>_tuned`` uses: its file, the method it validated, seeds,
    epochs and best row. A method's own study when there is one, else the other method's."""
    other = "cmda_offline" if method == "cmda" else "cmda"
    for studied in (method, other):
        path = study_path(Path(args.out), dataset, student, args.student_space, args.quick, studied)
        if path.is_file():
            study = json.loads(path.read_text())
            if study.get("loss_form", "mean") != args.loss_form:
                continue  # a pick made under another loss is not this run's pick
            return {"file": path.name, "method": study["method"], "seeds": study["seeds"],
                    "epochs": study["epochs"], "best": study["best"]}
    return None


def run_benchmark(args: argparse.Namespace, dataset: str, student: str) -> Path:
    data = prepare(dataset, student, args.student_space, study=False, quick_pixels=args.pixel_subset,
                   image_size=args.image_size, **data_options(args))
    seeds = list(range(args.seeds))
    methods: Dict[str, Any] = {}
    configs: Dict[str, Any] = {}
    space = "" if args.student_space == "features" else "pixels" if args.pixel_trunk == "resnet18" else "pixels-effnet"
    suffix = "-".join(part for part in (space, *variant_parts(args), args.tag) if part)
    path = C.result_path(args.out, "classification", dataset, student, suffix, quick=args.quick)
    plan = [] if args.add_tuned else [(m, T.FAITHFUL) for m in args.methods]
    studies = {m: tuned_study(args, dataset, student, m) for m in args.methods if m.startswith("cmda")}
    if not args.no_tuned and not args.add:
        plan += [(m + "_tuned", T.MixConfig(**study["best"]["config"])) for m, study in studies.items() if study]
    merge = args.add_tuned or args.add
    if args.add and not path.is_file():
        raise SystemExit(f"--add: expected an existing result file {path} to add {args.methods} to")
    previous = json.loads(path.read_text()) if merge and path.is_file() else None
    if previous is not None and previous["epochs"] != args.epochs:
        raise SystemExit(f"--add/--add-tuned: expected the epochs of {path} ({previous['epochs']}), got {args.epochs}")
    if previous is not None and previous.get("loss_form", "mean") != args.loss_form:
        raise SystemExit(f"--add/--add-tuned: expected the loss form of {path} "
                         f"({previous.get('loss_form', 'mean')!r}), got --loss-form {args.loss_form!r}")
    if previous is not None:  # merge the new methods into the existing result file
        methods.update(previous["methods"])
        configs.update(previous.get("cmda_configs", {}))
    timings = dict(previous.get("seconds", {})) if previous else {}
    # under the sum form the real rows weigh 1 in every method: base_matched is base (not rerun)
    alias = {"base_matched": "base"} if args.loss_form == "sum" and any(n == "base" for n, _ in plan) else {}
    if alias and not any(n == "base_matched" for n, _ in plan):
        alias = {}
    plan = [(name, cfg) for name, cfg in plan if name not in alias]
    # seed-major order: with --max-minutes the seeds that finish are complete for every method
    tasks = [(name, name.replace("_tuned", ""), cfg.as_dict(), s) for s in seeds for name, cfg in plan]
    partial = path.with_suffix(".partial.jsonl")
    done = run_tasks(args, dataset, student, False, data, tasks, partial=partial, desc=f"{dataset}/{student}")
    finished = complete_seeds(done, [name for name, _ in plan], seeds)
    if not finished:
        raise SystemExit("--max-minutes: no seed finished for every method; give it more time "
                         f"(finished runs are kept in {partial}; --resume continues)")
    if previous is not None and previous["seeds"] != finished:
        raise SystemExit(f"--add/--add-tuned: expected the seeds of {path} ({previous['seeds']}), got {finished}")
    for name, cfg in plan:
        methods[name] = C.summarise_method([done[(name, s)]["curve"] for s in finished])
        if args.select_on_val:
            methods[name] = selected_on_validation(methods[name], [done[(name, s)]["val_curve"] for s in finished])
        if T.method_parts(name)[0] in ("online", "offline"):
            configs[name] = cfg.as_dict()
        timings[name] = round(sum(done[(name, s)]["seconds"] for s in finished), 1)
        rec = methods[name]
        print(f"  {dataset}/{student} {name:20s} acc {100 * rec['mean']:.2f} ± {100 * rec['ci95']:.2f} "
              f"({timings[name]} s)", flush=True)
    for name, same in alias.items():
        methods[name] = dict(methods[same], identical_to=same,
                             note="loss_form 'sum': the real rows weigh 1 in every method, so Base is matched")
        timings[name] = 0.0
    seeds = finished
    # each *_tuned row's study: the file and the method it validated (a method without a study of
    # its own takes the other method's pick)
    tuned_from = dict(previous.get("tuned_from") or {}) if previous else {}
    for name, _ in plan:
        study = studies.get(name[:-len("_tuned")]) if name.endswith("_tuned") else None
        if study is not None:
            tuned_from[name] = {key: value for key, value in study.items() if key != "best"}
    payload = {
        "task": "classification", "dataset": dataset, "student": student, "teacher": T.other(student),
        "student_space": args.student_space,
        "student_features": f"photos {args.image_size}px, {PIXEL_TRUNKS[args.pixel_trunk][0]}"
        if args.student_space == "pixels"
        else T.feature_name(dataset, student, args.text_features),
        "teacher_features": T.feature_name(dataset, T.other(student), args.text_features),
        "metric": "accuracy", "quick": bool(args.quick), "seeds": seeds, "seeds_requested": args.seeds,
        "epochs": args.epochs,
        "device": ",".join(sorted({done[(n, s)].get("device", str(args.device)) for n, _ in plan for s in finished})),
        "aligner_epochs": args.aligner_epochs, "tag": args.tag,
        "loss_form": args.loss_form, "gen_weight": args.gen_weight,
        "loss": "sum: CE(real rows) + gen_weight * (sum of CE over the generated rows) / B: the real rows weigh 1 "
                "in every method, each generated row gen_weight times a real row"
                if args.loss_form == "sum" else "mean: one mean over the real and the generated rows "
                "(an augmented method's real rows weigh B / (B + G); base_matched copies that weight)",
        "data_dir": os.environ.get("CMDA_DATA_DIR", "../shared/data"),
        "split": {"train": int(len(data["train_rows"])), "test": int(len(data["eval_rows"])),
                  **({"validation": int(len(data["val_rows"]))} if "val_rows" in data else {})},
        "text_features": T.text_features_name(dataset, args.text_features), "train_frac": args.train_frac,
        "gen_per_real": args.gen_per_real,
        "selection": "the test accuracy at each seed's epoch of best validation accuracy (a stratified 20 % of the "
                     "train rows, never trained on)" if args.select_on_val else "last epoch",
        "methods": methods, "cmda_configs": configs, "seconds": timings,
        "tuned_from": tuned_from,
        "protocol": ("test accuracy at the epoch of best validation accuracy" if args.select_on_val else
                     "last epoch on the official test split") + "; tuned configs chosen on a validation split carved "
                    "from train (see the study file)",
    }
    C.write_result(path, payload, plot=not args.no_plot)
    partial.unlink(missing_ok=True)
    return path


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="all", choices=(*T.DATASETS, "all"))
    parser.add_argument("--student", default="all", choices=(*T.STUDENTS, "all"))
    parser.add_argument("--student-space", default="features", choices=("features", "pixels"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=(*METHODS, *CONTROLS))
    parser.add_argument("--study", action="store_true", help="validation study of the CMDA choices")
    parser.add_argument("--study-seeds", type=int, default=2)
    parser.add_argument("--study-method", default="cmda", choices=("cmda", "cmda_offline"))
    parser.add_argument("--no-references", action="store_true",
                        help="--study: skip the base and mixup reference runs on the validation split")
    parser.add_argument("--tag", default="",
                        help="suffix of the result file names, e.g. e200 for a 200-epoch variant")
    parser.add_argument("--no-tuned", action="store_true", help="skip the *_tuned methods")
    parser.add_argument("--add-tuned", action="store_true",
                        help="only run the *_tuned methods and merge them into the existing result file")
    parser.add_argument("--add", action="store_true",
                        help="run --methods (e.g. the align control) and merge them into the existing result file")
    parser.add_argument("--loss-form", default="sum", choices=T.LOSS_FORMS,
                        help="sum: CE(real) + gen-weight * CE(generated) (default; the real rows weigh 1 in every "
                             "method); mean: one mean over all rows (the results before the controls)")
    parser.add_argument("--gen-weight", type=float, default=1.0, help="weight of the generated rows' loss (sum)")
    parser.add_argument("--gen-per-real", type=int, default=1,
                        help="generated batches (independent draws) with every real batch (default 1)")
    parser.add_argument("--text-features", default="default", choices=("default", "minilm384", "lda10", "lda50"),
                        help="Wikipedia's text modality (default: minilm384); a teacher of another strength")
    parser.add_argument("--train-frac", type=float, default=1.0,
                        help="train on a stratified share of the train split (the same rows for every method)")
    parser.add_argument("--select-on-val", action="store_true",
                        help="train on 80 %% of the train rows and report each seed's test accuracy at its epoch "
                             "of best accuracy on the other 20 %%")
    parser.add_argument("--pixel-subset", type=int, default=None, help="pixels: train on this many photos")
    parser.add_argument("--image-size", type=int, default=None,
                        help="pixels: photo height and width (default 64; effnet_lite0: 224)")
    parser.add_argument("--pixel-trunk", default="resnet18", choices=tuple(PIXEL_TRUNKS),
                        help="pixels: ResNet-18 from scratch, or the ImageNet EfficientNet-Lite0 fine-tuned")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs (method x seed) in parallel processes (a GPU or a many-core machine)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no run after this many minutes; report the seeds every method finished")
    parser.add_argument("--resume", action="store_true",
                        help="skip the runs already in the .partial.jsonl next to the result file")
    parser.add_argument("--aligner-epochs", type=int, default=None,
                        help="offline aligner epochs (default 30; quick 10; smoke 2)")
    C.add_common_args(parser, default_epochs=50)
    args = parser.parse_args(argv)
    C.env_threads()
    C.resolve_preset(args, default_epochs=50 if args.student_space == "features" else 60,
                     quick_epochs=12 if args.student_space == "features" else 2, smoke_epochs=2)
    args.image_size = args.image_size or (224 if args.pixel_trunk == "effnet_lite0" else 64)
    if args.pixel_trunk == "effnet_lite0" and args.image_size != 224:
        raise SystemExit(f"--image-size: expected 224 for --pixel-trunk effnet_lite0, got {args.image_size}")
    if args.student_space == "pixels":
        args.dataset = "webnews" if args.dataset == "all" else args.dataset
        if args.dataset != "webnews":
            raise SystemExit("--student-space pixels: expected --dataset webnews (Wikipedia has no photos)")
        args.student = "image"
        if args.quick and args.pixel_subset is None:
            args.pixel_subset = 96 if args.smoke else 400
        if args.smoke:
            args.methods = [m for m in args.methods if m in ("base", "cmda_offline")]
    args.aligner_epochs = args.aligner_epochs or (2 if args.smoke else 10 if args.quick else 30)
    args.device = C.resolve_device(args.device)
    datasets = T.DATASETS if args.dataset == "all" else (args.dataset,)
    students = T.STUDENTS if args.student == "all" else (args.student,)
    for dataset in datasets:
        for student in students:
            path = run_study(args, dataset, student) if args.study else run_benchmark(args, dataset, student)
            print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
