"""Image captioning on Web News with and without CMDA (paper Section IV-J, Fig. 10).

Captioner: the EfficientNet-Lite0 image feature (1280-d, z-scored) -> ``Linear + tanh`` as
the initial state of a character-level GRU decoder (embedding 128, hidden 256) trained with
teacher forcing; greedy decoding; corpus BLEU-4 over characters on the test split
(:mod:`_bleu`). Targets are the first ``--max-len`` (20) characters of each Chinese caption
(the headline part); characters seen fewer than twice in train are ``<unk>``.

* ``base``: the real pairs.
* ``cmda``: offline CMDA (the paper aligns with a pretrained CLIP; here a ContrastiveAligner
  trained with Eq. 7 on the train pairs of image features and e5 text embeddings), an
  EmbeddingBank and :class:`~cmda_data.CMDACollate`. Row i's image feature becomes the mix
  guided by teacher i (its own caption's embedding), and the row keeps **caption i, the
  caption of the guiding teacher sample**. The share of mixed rows follows the attenuation
  coefficient ``p_e = p0 * (1 - e / E)`` (p0 = 0.5), so late epochs train on raw pairs.
* ``cmda_constant``: the same with a constant share ``p0`` (no attenuation), to show why the
  paper needs the coefficient.

Writes the result JSON (metric ``bleu4``), the convergence plot and a box plot over seeds
(``...-box.png``, as Fig. 10).
Run: ``python benchmarks/captioning.py`` (``--quick``, ``--smoke``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import _tasks as T  # noqa: E402
from _bleu import corpus_bleu  # noqa: E402

from cmda_data.augment.dataset import IndexedDataset  # noqa: E402
from cmda_data.datasets import classification_split, load_webnews  # noqa: E402

METHODS = ("base", "base_matched", "cmda", "cmda_constant", "random_teacher", "shuffled_teacher")
#: the teacher controls copy cmda's pipeline (offline bank, attenuation) with a useless teacher
CONTROL_OF = {"random_teacher": "random", "shuffled_teacher": "shuffled"}
PAD, BOS, EOS, UNK = 0, 1, 2, 3


class Vocab:
    def __init__(self, texts: List[str], min_count: int = 2) -> None:
        counts = Counter(ch for t in texts for ch in t)
        self.chars = ["<pad>", "<bos>", "<eos>", "<unk>"] + sorted(c for c, k in counts.items() if k >= min_count)
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str, length: int) -> torch.Tensor:
        ids = [BOS] + [self.index.get(c, UNK) for c in text] + [EOS]
        return torch.tensor(ids + [PAD] * (length + 2 - len(ids)), dtype=torch.long)

    def decode(self, ids: List[int]) -> List[str]:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.chars[i])
        return out


class Captioner(nn.Module):
    def __init__(self, in_dim: int, vocab: int, seed: int, hidden: int = 256, emb: int = 128) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.init = nn.Sequential(nn.Dropout(0.2), nn.Linear(in_dim, hidden), nn.Tanh())
        self.embed = nn.Embedding(vocab, emb, padding_idx=PAD)
        self.gru = nn.GRU(emb, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h0 = self.init(image).unsqueeze(0)
        output, _ = self.gru(self.embed(tokens[:, :-1]), h0)
        return self.out(output)

    @torch.no_grad()
    def greedy(self, image: torch.Tensor, max_len: int) -> torch.Tensor:
        h = self.init(image).unsqueeze(0)
        token = torch.full((image.shape[0], 1), BOS, dtype=torch.long, device=image.device)
        steps = []
        for _ in range(max_len + 1):
            output, h = self.gru(self.embed(token), h)
            token = self.out(output).argmax(-1)
            steps.append(token)
        return torch.cat(steps, 1)


def prepare(max_len: int, subset: Optional[int] = None) -> Dict[str, Any]:
    table = load_webnews(split="all", image="features", captions=True)
    split = classification_split(table.is_train.numpy())
    train_rows, test_rows = split["train"], split["test"]
    if subset:
        train_rows, test_rows = train_rows[:subset], test_rows[:max(subset // 3, 8)]
    heads = [c.replace("\u3000", "").replace("\n", "").strip()[:max_len] for c in table.captions]
    vocab = Vocab([heads[r] for r in train_rows])
    cols = T.columns(table, train_rows, train_rows)
    test = T.columns(table, test_rows, train_rows)
    cols["tokens"] = torch.stack([vocab.encode(heads[r], max_len) for r in train_rows])
    return {"train": cols, "test": test, "vocab": vocab, "refs": [[list(heads[r])] for r in test_rows],
            "sizes": {"train": int(len(train_rows)), "test": int(len(test_rows))}, "max_len": max_len}


def share(method: str, epoch: int, epochs: int, p0: float) -> float:
    """Mixed-row share of epoch ``epoch``: the attenuation coefficient (cmda) or constant."""
    if method == "cmda_constant":
        return p0
    return p0 * (1.0 - epoch / epochs)  # cmda and its teacher controls


def run_one(method: str, data: Dict[str, Any], seed: int, epochs: int, device: torch.device, *, p0: float = 0.5,
            batch_size: int = 64, aligner_epochs: int = 30) -> List[float]:
    train, vocab = data["train"], data["vocab"]
    model = Captioner(train["image"].shape[1], len(vocab), seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    dataset = IndexedDataset(T.ColumnDataset(train))
    bank = None
    cfg = T.FAITHFUL
    if method != "base":
        pairs = {"image": train["image"], "text": train["text"], "label": train["label"]}
        aligner = T.fit_offline_aligner(pairs, "image", loss="eq7", epochs=aligner_epochs, seed=seed)
        bank = T.control_bank(T.build_bank(aligner, IndexedDataset(T.ColumnDataset(pairs)), "image", cfg, seed),
                              CONTROL_OF.get(method), seed)
    # one collate for the whole run: set_epoch and set_p (the attenuation coefficient) per epoch
    collate = None if bank is None else T.make_collate(bank, replace(cfg, p=p0), num_classes=None, seed=seed,
                                                       target=None)
    curve = []
    for epoch in range(epochs):
        if collate is not None:
            collate.set_epoch(epoch)
            collate.set_p(share(method, epoch, epochs, p0))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=C.generator(seed, 5, epoch),
                            collate_fn=collate)
        model.train()
        for batch in loader:
            tokens = batch["tokens"].to(device)
            logits = model(batch["image"].to(device), tokens)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                               ignore_index=PAD)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
        curve.append(bleu(model, data, device))
    return curve


def bleu(model: Captioner, data: Dict[str, Any], device: torch.device) -> float:
    model.eval()
    ids = torch.cat([model.greedy(c.to(device), data["max_len"]).cpu() for c in data["test"]["image"].split(256)])
    hyps = [data["vocab"].decode(row.tolist()) for row in ids]
    return corpus_bleu(hyps, data["refs"], 4)


def box_plot(payload: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["methods"])
    values = [[100 * v for v in payload["methods"][m]["per_seed"]] for m in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    ax.boxplot(values, whis=(0, 100), showmeans=True, meanprops={"marker": "^"})
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylabel("BLEU-4 (%) , last epoch")
    ax.set_title(f"captioning Web News, {len(payload['seeds'])} seeds (whiskers: min/max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--add", action="store_true",
                        help="run --methods (e.g. the teacher controls) and merge them into the existing result file")
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--p0", type=float, default=0.5, help="initial share of mixed rows")
    parser.add_argument("--subset", type=int, default=None, help="train on this many pairs (smoke)")
    C.add_common_args(parser, default_epochs=20)
    args = parser.parse_args(argv)
    C.env_threads()
    C.resolve_preset(args, default_epochs=20, quick_epochs=8, smoke_epochs=2)
    if args.smoke and args.subset is None:
        args.subset = 300
    device = C.resolve_device(args.device)
    data = prepare(args.max_len, args.subset)
    seeds = list(range(args.seeds))
    path = C.result_path(args.out, "captioning", "webnews", "image", quick=args.quick)
    if args.add and not path.is_file():
        raise SystemExit(f"--add: expected an existing result file {path} to add {args.methods} to")
    previous = json.loads(path.read_text()) if args.add else None
    if previous is not None and (previous["seeds"], previous["epochs"]) != (seeds, args.epochs):
        raise SystemExit(f"--add: expected the seeds and epochs of {path} ({previous['seeds']}, "
                         f"{previous['epochs']}), got {seeds}, {args.epochs}")
    methods = dict(previous["methods"]) if previous else {}
    timings = dict(previous.get("seconds", {})) if previous else {}
    # mixed rows replace real ones (no rows are added): every row weighs 1/B in every method,
    # so base_matched is base (not rerun)
    for name in [m for m in args.methods if m != "base_matched"]:
        start = time.time()
        curves = [run_one(name, data, s, args.epochs, device, p0=args.p0,
                          aligner_epochs=2 if args.smoke else 10 if args.quick else 30)
                  for s in C.progress(seeds, desc=f"captioning {name}", enabled=not args.no_progress)]
        methods[name] = C.summarise_method(curves)
        timings[name] = round(time.time() - start, 1)
        print(f"  captioning {name:14s} BLEU-4 {100 * methods[name]['mean']:.2f} ± {100 * methods[name]['ci95']:.2f} "
              f"({timings[name]} s)", flush=True)
    if "base_matched" in args.methods and "base" in methods:
        methods["base_matched"] = dict(methods["base"], identical_to="base",
                                       note="mixed rows replace real rows: every row weighs 1/B in every method")
        timings["base_matched"] = 0.0
    payload = {
        "task": "captioning", "dataset": "webnews", "student": "image", "teacher": "text",
        "student_features": T.FEATURE_NAMES["webnews"]["image"], "teacher_features": T.FEATURE_NAMES["webnews"]["text"],
        "metric": "bleu4", "quick": bool(args.quick), "seeds": seeds, "epochs": args.epochs, "methods": methods,
        "split": data["sizes"], "vocab_size": len(data["vocab"]), "max_len": args.max_len,
        "attenuation": f"p_e = {args.p0} * (1 - e / E) for cmda and its teacher controls, constant {args.p0} "
                       "for cmda_constant",
        "loss_form": "replace", "loss": "mean cross-entropy over the B rows of a batch, mixed rows replacing real ones",
        "caption_of_mixed_rows": "the caption of the guiding teacher sample (the row's own caption)",
        "bleu": "corpus BLEU-4 over characters, no smoothing, greedy decoding", "seconds": timings,
    }
    C.write_result(path, payload, plot=not args.no_plot)
    if not args.no_plot:
        box_plot(payload, path.with_name(path.stem + "-box.png"))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
