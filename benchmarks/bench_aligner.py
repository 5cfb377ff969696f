"""Benchmark: how good is the latent space a ContrastiveAligner learns? (Wikipedia, cross-modal retrieval)

Data: the Wikipedia cross-modal data set (Rasiwasia et al. 2010; ``shared/data/wikipedia``,
see its SOURCE.md), official split 2,173 train / 693 test, 10 classes.
Image = SIFT bag-of-visual-words (128-d, ``raw_features.mat`` I_tr / I_te); text =
all-MiniLM-L6-v2 sentence embeddings (384-d, ``derived_minilm_l6_text_emb.npy``, rows train
then test). Both are standardised with train statistics.

Aligners (all trained on the train split only, evaluated on the test split):

* ``untrained``: a ContrastiveAligner with freshly initialised heads (the floor);
* ``eq7``: unsupervised Eq. 7 (pairs only, no labels);
* ``eq8``: supervised Eq. 8 (class labels);
* ``supcon``: the official code's NT-Xent (SupConLoss without labels, x tau/0.07), unsupervised;
* ``CCA-k``: scikit-learn ``CCA(n_components=k)``, the classic linear baseline.

Metrics, both directions (image -> text and text -> image), on the 693 test pairs:

* ``top1``: fraction of queries whose nearest neighbour (cosine) is their own pair;
* ``mAP``: the standard Wikipedia protocol: all test items of the other modality are
  ranked by cosine similarity and a retrieved item is relevant when it has the query's
  class; mean over queries of the average precision over the full ranking.

Chance level: top1 = 1/693 = 0.0014; mAP is about 0.11 (the class balance).

Writes ``benchmarks/results/bench_aligner.json``. Run:
``python benchmarks/bench_aligner.py`` (< 5 min on 2 cores) or ``--quick`` (< 1 min).
``CMDA_DATA_DIR`` overrides the data folder (default ``<repo>/../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    # one thread by default: on a shared 2-core machine two threads per op oversubscribe the
    # cores and run 10-50x slower; override by setting the variables yourself
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import scipy.io  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from cmda_data.aligners import ContrastiveAligner  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_aligner.json"


def data_dir() -> Path:
    override = os.environ.get("CMDA_DATA_DIR")
    root = Path(override) if override else REPO.parent / "shared" / "data"
    return root / "wikipedia"


def load_wikipedia(folder: Path):
    mat = scipy.io.loadmat(str(folder / "raw_features.mat"))
    image_train, image_test = mat["I_tr"].astype(np.float32), mat["I_te"].astype(np.float32)
    text = np.load(folder / "derived_minilm_l6_text_emb.npy").astype(np.float32)
    labels = np.load(folder / "derived_labels_train_then_test.npy").astype(np.int64)
    n_train = image_train.shape[0]
    if text.shape[0] != n_train + image_test.shape[0] or labels.shape[0] != text.shape[0]:
        raise SystemExit(f"unexpected row counts in {folder}: image {n_train}+{image_test.shape[0]}, "
                         f"text {text.shape[0]}, labels {labels.shape[0]}")
    text_train, text_test = text[:n_train], text[n_train:]

    def standardise(train, test):
        mean, std = train.mean(0), train.std(0) + 1e-6
        return (train - mean) / std, (test - mean) / std

    image_train, image_test = standardise(image_train, image_test)
    text_train, text_test = standardise(text_train, text_test)
    return {
        "train": {"image": image_train, "text": text_train, "label": labels[:n_train]},
        "test": {"image": image_test, "text": text_test, "label": labels[n_train:]},
    }


# ---------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval(query: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> dict:
    """top-1 own-pair accuracy and class-relevance mAP over the full ranking (row i pairs with i)."""
    sim = _unit(query) @ _unit(gallery).T
    n = sim.shape[0]
    top1 = float((sim.argmax(1) == np.arange(n)).mean())
    order = np.argsort(-sim, axis=1, kind="stable")
    relevant = labels[order] == labels[:, None]  # [n, n] in rank order
    hits = np.cumsum(relevant, axis=1)
    precision = hits / np.arange(1, n + 1)[None, :]
    ap = (precision * relevant).sum(1) / np.maximum(relevant.sum(1), 1)
    return {"top1": top1, "mAP": float(ap.mean())}


def evaluate(z_image: np.ndarray, z_text: np.ndarray, labels: np.ndarray) -> dict:
    i2t = retrieval(z_image, z_text, labels)
    t2i = retrieval(z_text, z_image, labels)
    return {"i2t_top1": i2t["top1"], "t2i_top1": t2i["top1"], "i2t_mAP": i2t["mAP"], "t2i_mAP": t2i["mAP"],
            "mean_mAP": (i2t["mAP"] + t2i["mAP"]) / 2}


# ---------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------
def make_aligner(loss: str, hidden, dim: int, tau: float, seed: int) -> ContrastiveAligner:
    return ContrastiveAligner({"image": nn.Identity(), "text": nn.Identity()}, dim=dim, loss=loss, tau=tau,
                              head_hidden=hidden, in_features={"image": 128, "text": 384}, seed=seed)


def embed_test(aligner: ContrastiveAligner, test: dict) -> tuple:
    z_image = aligner.embed("image", torch.from_numpy(test["image"])).numpy()
    z_text = aligner.embed("text", torch.from_numpy(test["text"])).numpy()
    return z_image, z_text


def run_contrastive(name, loss, data, args, hidden):
    aligner = make_aligner("eq7" if loss == "none" else loss, hidden, args.dim, args.tau, args.seed)
    start = time.perf_counter()
    history = []
    if loss != "none":
        train = {k: torch.from_numpy(v) for k, v in data["train"].items()}
        history = aligner.fit(train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              weight_decay=args.weight_decay, momentum=args.momentum,
                              target="label" if loss == "eq8" else None, progress=not args.no_progress,
                              seed=args.seed)
    seconds = time.perf_counter() - start
    metrics = evaluate(*embed_test(aligner, data["test"]), data["test"]["label"])
    return {"method": name, "loss": loss, "head_hidden": "paper" if hidden is None else list(hidden),
            "fit_seconds": round(seconds, 2), "final_loss": history[-1] if history else None, **metrics}


def run_cca(k, data):
    from sklearn.cross_decomposition import CCA

    start = time.perf_counter()
    cca = CCA(n_components=k, max_iter=1000)
    cca.fit(data["train"]["image"], data["train"]["text"])
    z_image, z_text = cca.transform(data["test"]["image"], data["test"]["text"])
    seconds = time.perf_counter() - start
    return {"method": f"sklearn CCA-{k}", "loss": None, "head_hidden": None, "fit_seconds": round(seconds, 2),
            "final_loss": None,
            **evaluate(z_image, z_text, data["test"]["label"])}


def format_table(rows) -> str:
    head = f"{'method':<28} {'i2t top1':>9} {'t2i top1':>9} {'i2t mAP':>8} {'t2i mAP':>8} {'mean mAP':>9} {'fit s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<28} {r['i2t_top1']:>9.4f} {r['t2i_top1']:>9.4f} {r['i2t_mAP']:>8.4f} "
                     f"{r['t2i_mAP']:>8.4f} {r['mean_mAP']:>9.4f} {r['fit_seconds']:>7.1f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and one CCA size (< 1 min)")
    parser.add_argument("--epochs", type=int, default=None, help="default 30 (quick: 10)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, nargs="*", default=[1024],
                        help="hidden widths of the MLP-head rows (default 1024)")
    parser.add_argument("--paper-heads", action="store_true",
                        help="also train eq7 with the paper's heads (2048 / 4096-4096; adds minutes on CPU)")
    parser.add_argument("--cca", type=int, nargs="*", default=None, help="CCA sizes (default 10 16 32; quick: 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (10 if args.quick else 30)
    cca_sizes = args.cca if args.cca is not None else ([10] if args.quick else [10, 16, 32])
    torch.set_num_threads(args.threads)
    mlp = tuple(args.hidden)
    runs = [("untrained (linear heads)", "none", ()), ("eq7, linear heads", "eq7", ()),
            ("eq8, linear heads", "eq8", ())]
    if not args.quick:
        runs += [(f"eq7, MLP heads {list(mlp)}", "eq7", mlp), (f"eq8, MLP heads {list(mlp)}", "eq8", mlp),
                 ("supcon (code NT-Xent)", "supcon", ())]
    if args.paper_heads:
        runs.append(("eq7, paper heads", "eq7", None))

    folder = data_dir()
    if not (folder / "raw_features.mat").is_file():
        raise SystemExit(f"Wikipedia data not found in {folder} (set CMDA_DATA_DIR to the shared/data folder)")
    data = load_wikipedia(folder)
    print(f"Wikipedia: train {len(data['train']['label'])}, test {len(data['test']['label'])}; "
          f"image SIFT-128, text MiniLM-384; dim {args.dim}, tau {args.tau}, {args.epochs} epochs, "
          f"batch {args.batch_size}, SGD lr {args.lr} momentum {args.momentum} wd {args.weight_decay}")
    start = time.perf_counter()
    rows = [run_contrastive(name, loss, data, args, hidden) for name, loss, hidden in runs]
    rows += [run_cca(k, data) for k in cca_sizes]
    total = time.perf_counter() - start
    table = format_table(rows)
    print(table)
    print(f"total {total:.1f} s (chance: top1 {1 / len(data['test']['label']):.4f}, "
          f"mAP about {np.mean([np.mean(data['test']['label'] == c) for c in data['test']['label']]):.3f})")
    result = {
        "benchmark": "bench_aligner",
        "data": str(folder),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "table": table,
        "total_seconds": round(total, 1),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
