"""What CMDA's weights do to a batch: effective partners, label purity, distance to the mean.

Why this exists: on the real features, faithful CMDA (dense weights over the whole batch)
gains little or nothing over Base in several of our task benchmarks (see README). This
script measures, on the same trained latent space the task benchmarks use (offline aligner,
Eq. 8, 30 epochs, on the train split), what each open choice does to the generated samples of
random train batches of B = 128:

* ``eff_partners``: ``1 / sum_j W_ij^2`` per row (128 = the batch mean, 1 = one real sample);
* ``max_weight``: the largest weight of a row;
* ``same_class``: the weight mass on partners of the row's own (teacher's) class;
* ``label_purity``: the largest entry of the mixed soft label ``W @ onehot(y)`` (the target
  the task is trained on; 1/C = uniform);
* ``to_mean``: ``||x_mix - mean(x)|| / mean_j ||x_j - mean(x)||`` in the student's input
  space (0 = the batch mean, about 1 = as far out as a real sample);
* ``bic_m``: the number of GMM components BIC picks on the language latents (1..6), the
  paper's criterion for M.

Run: ``python benchmarks/weights_diagnostics.py`` (all four pairs, about a minute per pair on
2 CPU cores); writes ``results/diagnostics-weights.json`` with a Markdown table and a bar
plot next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import _tasks as T  # noqa: E402

from cmda_data.core.build import make_plan  # noqa: E402
from cmda_data.core.mixture import GaussianMixture, select_n_components  # noqa: E402
from cmda_data.datasets import classification_split  # noqa: E402

B = 128
METRICS = ("eff_partners", "max_weight", "same_class", "label_purity", "to_mean")


def batch_metrics(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> Dict[str, float]:
    """The metrics above for one batch (``W`` [B, B] dense, rows sum to 1)."""
    onehot = torch.nn.functional.one_hot(y, num_classes).to(W.dtype)
    soft = W @ onehot
    mixed = W @ x
    centre = x.mean(0, keepdim=True)
    spread = (x - centre).norm(dim=1).mean()
    return {"eff_partners": float((1.0 / W.pow(2).sum(1)).mean()),
            "max_weight": float(W.amax(1).mean()),
            "same_class": float((W * (y[:, None] == y[None, :])).sum(1).mean()),
            "label_purity": float(soft.amax(1).mean()),
            "to_mean": float((mixed - centre).norm(dim=1).mean() / spread)}


def diagnose(dataset: str, student: str, *, batches: int, seed: int, aligner_epochs: int) -> Dict[str, Any]:
    table = T.load_table(dataset)
    rows = classification_split(table.is_train.numpy())["train"]
    train = T.columns(table, rows, rows)
    teacher = T.other(student)
    aligner = T.fit_offline_aligner(train, student, loss="eq8", epochs=aligner_epochs, seed=seed)
    with torch.no_grad():
        z = {m: aligner.embed(m, train[m]) for m in (student, teacher)}
    text = z["text"]
    cov = "full" if text.shape[0] > 5 * text.shape[1] else "diag"
    bic_m, bic = select_n_components(text, range(1, 7), covariance_type=cov, reg_covar=1e-4, random_state=seed)
    resp = GaussianMixture(2, covariance_type=cov, reg_covar=1e-4, random_state=seed).fit(text).predict_proba(text)
    gen = C.generator(seed, 11)
    draws = [torch.randperm(len(rows), generator=gen)[:B] for _ in range(batches)]
    num_classes = table.num_classes
    configs: Dict[str, Any] = {}
    for cfg in (*T.STUDY_GRID, replace(T.FAITHFUL, intra="hard")):
        if cfg.p != 1.0 or cfg.label() in configs:
            continue  # p only changes how many rows are mixed, not the weights
        options = cfg.options()
        options.pop("p")
        sums = {k: 0.0 for k in METRICS}
        for b in draws:
            plan = make_plan(z[teacher][b], z[student][b], resp_rows=resp[b] if options["intra"] else None,
                             generator=C.generator(seed, 12), **options)
            for k, v in batch_metrics(plan.dense(B).double(), train[student][b].double(), train["label"][b],
                                      num_classes).items():
                sums[k] += v / len(draws)
        configs[cfg.label()] = {"config": cfg.as_dict(), **sums}
    return {"dataset": dataset, "student": student, "teacher": teacher, "batch": B, "batches": batches,
            "num_classes": num_classes, "bic_m": bic_m, "bic": {str(k): v for k, v in bic.items()},
            "configs": configs}


def markdown(payload: Dict[str, Any]) -> str:
    lines = ["**What the weights do to a batch of 128** (train split, offline aligner Eq. 8; "
             "mean over rows and batches)", "",
             "| pair | config | eff. partners | max weight | same-class mass | soft-label max | to batch mean |",
             "|---|---|---|---|---|---|---|"]
    for pair in payload["pairs"]:
        name = f"{pair['dataset']} {pair['student']} (BIC M = {pair['bic_m']})"
        for label, rec in pair["configs"].items():
            lines.append(f"| {name} | {label} | {rec['eff_partners']:.1f} | {rec['max_weight']:.3f} | "
                         f"{rec['same_class']:.3f} | {rec['label_purity']:.3f} | {rec['to_mean']:.3f} |")
            name = ""
    return "\n".join(lines)


def plot(payload: Dict[str, Any], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the bench extra
        return None
    pairs = payload["pairs"]
    labels = list(pairs[0]["configs"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    width = 0.8 / len(pairs)
    for ax, metric, title in zip(axes, ("eff_partners", "same_class", "to_mean"),
                                 ("effective partners per row (log)", "weight on same-class partners",
                                  "distance to the batch mean (real sample ~ 1)")):
        for p, pair in enumerate(pairs):
            values = [pair["configs"][c][metric] for c in labels]
            ax.bar([i + p * width for i in range(len(labels))], values, width,
                   label=f"{pair['dataset']} {pair['student']}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if metric == "eff_partners":
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(pairs), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="all", choices=(*T.DATASETS, "all"))
    parser.add_argument("--student", default="all", choices=(*T.STUDENTS, "all"))
    parser.add_argument("--batches", type=int, default=20, help="random train batches per pair")
    parser.add_argument("--aligner-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(C.RESULTS_DIR))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    C.env_threads()
    pairs = [(d, s) for d in (T.DATASETS if args.dataset == "all" else (args.dataset,))
             for s in (T.STUDENTS if args.student == "all" else (args.student,))]
    start = time.time()
    results = [diagnose(d, s, batches=args.batches, seed=args.seed, aligner_epochs=args.aligner_epochs)
               for d, s in C.progress(pairs, desc="pairs", enabled=not args.no_progress)]
    payload = {"benchmark": "weights_diagnostics", "seconds": round(time.time() - start, 1),
               "aligner": f"ContrastiveAligner Eq. 8, {args.aligner_epochs} epochs, heads {T.HEAD_HIDDEN}",
               "gmm": "M = 2 on the language latents (as the task benchmarks); bic_m is BIC's choice over 1..6",
               "pairs": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "diagnostics-weights.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    table = markdown(payload)
    path.with_suffix(".md").write_text(table + "\n")
    if not args.no_plot:
        plot(payload, path.with_suffix(".png"))
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
