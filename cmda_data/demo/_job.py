"""The job behind ``cmda demo`` (private): train, build a bank, mix, draw, summarise.

Steps, each through the public API exactly as a user would call it:

1. train a small :class:`~cmda_data.aligners.ContrastiveAligner` (Eq. 7) on the train split
   and measure held-out retrieval (teacher -> student top-1) against chance;
2. build an :class:`~cmda_data.bank.EmbeddingBank` of the train split (GMM, M by BIC) and save it;
3. generate mixed samples with :class:`~cmda_data.augment.dataset.CrossModalAugmentedDataset`
   through a ``DataLoader`` and measure how often the partners agree with the guiding
   sample (shape / colour or class) against chance;
4. draw a PNG (grid of images, or a table for feature vectors) and write ``summary.json``.

The data-set specific parts (data, encoders, captions, figure) live in
:mod:`cmda_data.demo._data`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Subset

from ..augment.dataset import CrossModalAugmentedDataset
from ..bank._bank import EmbeddingBank
from ..core._validation import check_int, check_option, check_positive_float, fail
from ..exceptions import CMDAWarning, DeviceError
from . import _data as _demo_data

__all__ = ["DATA_CHOICES", "DemoConfig", "run_demo"]

DATA_CHOICES = ("shapes", "wikipedia", "webnews")
PNG_NAME = "cmda_demo_{data}.png"
JSON_NAME = "summary_{data}.json"


@dataclass
class DemoConfig:
    """Settings of ``cmda demo`` (the CLI options)."""

    out: Path = Path("cmda_demo_out")
    data: str = "shapes"
    seed: int = 0
    epochs: Optional[int] = None      # None: the data set's default
    n: Optional[int] = None           # None: the data set's default
    device: str = "cpu"
    rows: int = 8
    top_k: int = 4
    pool_size: int = 256
    temperature: Optional[float] = None  # None: the paper's ratio weights (Eq. 10)
    progress: bool = True

    def validate(self) -> "DemoConfig":
        check_option("--data", self.data, DATA_CHOICES)
        check_int("--seed", self.seed, minimum=0)
        if self.epochs is not None:  # None: the data set's default
            check_int("--epochs", self.epochs, minimum=1)
        if self.n is not None:
            check_int("--n", self.n, minimum=20)
        check_int("--rows", self.rows, minimum=1)
        if self.rows > 16:
            fail("--rows", "at most 16 rows (the figure gets too tall)", self.rows)
        check_int("--top-k", self.top_k, minimum=1)
        if self.top_k > 8:
            fail("--top-k", "at most 8 partners per row (the figure gets too wide)", self.top_k)
        check_int("--pool-size", self.pool_size, minimum=2)
        self.temperature = check_positive_float("--temperature", self.temperature, allow_none=True)
        self.device = check_device(self.device)
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            fail("--out", "a folder (or a path that does not exist yet)", str(self.out), raw=True)
        return self


def check_device(device: str) -> str:
    """``device`` if torch can use it here, else a :class:`DeviceError` that says why."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        fail("--device", "a torch device such as 'cpu' or 'cuda:0'", device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            fail("--device", "a visible CUDA device (torch.cuda.is_available() is False here)", device,
                 DeviceError)
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            fail("--device", f"a CUDA index below {torch.cuda.device_count()}", device, DeviceError)
    elif parsed.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            fail("--device", "an available MPS device", device, DeviceError)
    elif parsed.type != "cpu":
        fail("--device", "'cpu', 'cuda[:i]' or 'mps'", device)
    return str(parsed)


def _finite(value: Any) -> Any:
    """Round floats for the JSON summary; non-finite values become None (never NaN in JSON)."""
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def retrieval_top1(query: torch.Tensor, gallery: torch.Tensor, query_keys: torch.Tensor,
                   gallery_keys: torch.Tensor) -> Dict[str, float]:
    """Top-1 retrieval (query -> nearest gallery row by cosine) where a hit shares the key.

    Chance is the expected hit rate of a uniformly random gallery row.

    Examples:
        >>> z = torch.eye(3)
        >>> result = retrieval_top1(z, z, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]))
        >>> {k: round(v, 4) for k, v in result.items()}
        {'top1': 1.0, 'chance': 0.5556}
    """
    nearest = (query @ gallery.T).argmax(dim=1)
    hits = (gallery_keys[nearest] == query_keys).float().mean().item()
    same = (query_keys[:, None] == gallery_keys[None, :]).float().mean(dim=1)
    return {"top1": float(hits), "chance": float(same.mean().item())}


def agreement(partners: torch.Tensor, weights: torch.Tensor, guides: torch.Tensor, keys: torch.Tensor
              ) -> Dict[str, float]:
    """Share of partners (weight > 0) whose key equals their guide's, and the chance level.

    Chance: the share of the other samples with the guide's key (partners drawn at random).

    Examples:
        >>> keys = torch.tensor([0, 0, 1, 1])
        >>> result = agreement(torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.5]]), torch.tensor([0]), keys)
        >>> {k: round(v, 4) for k, v in result.items()}
        {'share': 0.5, 'chance': 0.3333}
    """
    used = weights > 0
    same = (keys[partners] == keys[guides][:, None]) & used
    share = same.sum().item() / max(1, used.sum().item())
    counts = torch.bincount(keys, minlength=int(keys.max()) + 1).float()
    chance = ((counts[keys[guides]] - 1) / max(1, len(keys) - 1)).mean().item()
    return {"share": float(share), "chance": float(chance)}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run small per-sample tensor ops on one thread (as DataLoader workers do), then restore.

    Items of a map-style dataset are many tiny ops; intra-op threads only add overhead
    there (about 10x slower on a busy 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def generate(aug: Any, *, batch_size: int = 128, limit: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Iterate a DataLoader over the augmented dataset; collect the ``mix_info`` records."""
    data = aug if limit is None or limit >= len(aug) else Subset(aug, range(limit))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    infos: Dict[str, List[torch.Tensor]] = {"index": [], "partners": [], "weights": [], "mixed": []}
    with one_thread():
        for batch in loader:
            for key in infos:
                infos[key].append(batch["mix_info"][key])
    return {key: torch.cat(parts) for key, parts in infos.items()}


def run_demo(config: DemoConfig, echo: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the demo job; return the summary (also written as JSON next to the PNG)."""
    config.validate()
    start = time.perf_counter()
    seconds: Dict[str, float] = {}
    task = _demo_data.load_task(config)
    seconds["load"] = time.perf_counter() - start
    echo(f"cmda demo: {task.description}; seed {config.seed}, device {config.device}")

    # 1. the latent space
    tick = time.perf_counter()
    history = task.aligner.fit(task.train_columns, epochs=task.epochs, batch_size=task.batch_size, lr=task.lr,
                               seed=config.seed, progress=config.progress, device=config.device)
    heldout = {m: task.aligner.embed(m, x.to(config.device)).cpu() for m, x in task.heldout_columns.items()}
    retrieval = retrieval_top1(heldout["text"], heldout["image"], task.heldout_keys, task.heldout_keys)
    seconds["train"] = time.perf_counter() - tick
    echo(f"[1/4] trained ContrastiveAligner ({task.aligner_text}, Eq. 7 loss, {task.epochs} epochs): "
         f"loss {history[0]:.3f} -> {history[-1]:.3f}")
    echo(f"      held-out retrieval caption -> {task.student_word} top-1 ({task.key_word}): "
         f"{retrieval['top1']:.3f} (chance {retrieval['chance']:.3f}, {len(task.heldout_keys)} pairs)")

    # 2. the bank
    tick = time.perf_counter()
    with warnings.catch_warnings():  # said once, as a note at the end, not in the middle of the steps
        warnings.filterwarnings("ignore", r"(BIC|AIC) chose M = 1", CMDAWarning)
        warnings.filterwarnings("ignore", r"(BIC|AIC) on .* is best for an M whose smallest component", CMDAWarning)
        bank = EmbeddingBank.build(task.bank_dataset, task.aligner, student="image", teachers=["text"],
                                   device=config.device, progress=config.progress, **task.bank_options).to("cpu")
    bank_dir = bank.save(config.out / f"bank_{config.data}")
    seconds["bank"] = time.perf_counter() - tick
    bic = bank.metadata.get("n_components_scores") or {}
    pca = f" (first {bank.metadata['reduce_dim']} principal components)" if bank.metadata.get("reduce_dim") else ""
    echo(f"[2/4] built EmbeddingBank: {len(bank)} rows, dim {bank.dim}, GMM on {bank.fit_on} embeddings{pca}, "
         f"M = {bank.n_components} by BIC over {', '.join(bic) or '-'}; saved to {bank_dir}")

    if bic and bank.n_components == max(int(m) for m in bic):
        task.notes.append(f"BIC still falls at M = {bank.n_components}, the largest candidate tried: the teacher "
                          "embeddings form more clusters (EmbeddingBank.build(..., candidates=range(1, 21)) tries more)")

    degenerate = bank.metadata.get("n_components_degenerate") or {}
    lower = [m for m in degenerate if bic and bic[m] < bic.get(str(bank.n_components), float("inf"))]
    if lower:
        covariance = getattr(bank.gmm, "covariance_type", "full")
        task.notes.append(f"BIC fell further at M = {', '.join(lower)}, but there the smallest component holds "
                          f"fewer rows than a {covariance} covariance of dimension "
                          f"{bank.metadata.get('reduce_dim') or bank.dim} needs (a singular fit, not a cluster): "
                          f"M = {bank.n_components} is the best M that fits")

    if bank.metadata.get("dca_inert"):
        task.notes.append(f"BIC chose M = 1 on the {bank.fit_on} embeddings, so the intra-modal (DCA) weights are "
                          "all equal and do nothing here: only the teacher's inter-modal weights pick the partners "
                          "(pass n_components=2 to EmbeddingBank.build to force DCA)")

    # 3. mixed samples with the library's entry point
    tick = time.perf_counter()
    aug = CrossModalAugmentedDataset(task.mix_dataset, bank, student="image", teachers=["text"], target="label",
                                     num_classes=task.num_classes, p=1.0, pool_size=config.pool_size,
                                     top_k=config.top_k, exclude_self=True, seed=config.seed,
                                     temperature=config.temperature)
    pool = min(config.pool_size, len(task.mix_dataset) - 1)  # exclude_self: the others at most
    info = generate(aug, limit=task.generate_limit)
    top_weight = info["weights"].max(dim=1).values.mean().item()
    agree = {name: agreement(info["partners"], info["weights"], info["index"], keys)
             for name, keys in task.agreement_keys.items()}
    seconds["generate"] = time.perf_counter() - tick
    shares = ", ".join(f"{name} {a['share']:.2f} (chance {a['chance']:.2f})" for name, a in agree.items())
    echo(f"[3/4] generated {len(info['index'])} mixed samples with CrossModalAugmentedDataset "
         f"(pool {pool}, top-{aug.k}): mean top-partner weight {top_weight:.3f}")
    echo(f"      partners that share the guiding caption's {shares}")

    # 4. the figure and the summary
    tick = time.perf_counter()
    with one_thread():
        png = task.render(aug, config.out / PNG_NAME.format(data=config.data), config.rows)
    seconds["render"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - start
    summary = {
        "data": config.data,
        "description": task.description,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "aligner": {"class": "ContrastiveAligner", "loss": "eq7", "tau": task.aligner.tau,
                    "dim": task.aligner.dim, "encoders": task.encoder_text, "epochs": task.epochs,
                    "batch_size": task.batch_size, "lr": task.lr, "train_pairs": task.train_size,
                    "parameters": sum(p.numel() for p in task.aligner.parameters()),
                    "loss_history": history},
        "retrieval": {"direction": "text -> image", "match": task.key_word, "heldout_pairs": len(task.heldout_keys),
                      **retrieval},
        "bank": {"path": str(bank_dir), "rows": len(bank), "dim": bank.dim, "fit_on": bank.fit_on,
                 "n_components": bank.n_components, "criterion": bank.metadata.get("criterion"), "bic": bic,
                 "degenerate": degenerate, "reduce_dim": bank.metadata.get("reduce_dim")},
        "generation": {"entry_point": "CrossModalAugmentedDataset",
                       "options": {"p": 1.0, "pool_size": pool, "top_k": aug.k, "intra": "soft",
                                   "temperature": config.temperature, "exclude_self": True, "seed": config.seed},
                       "samples": len(info["index"]), "mean_top_partner_weight": top_weight,
                       "partner_agreement": agree},
        "figure": {"png": str(png), "rows": min(config.rows, len(aug)), "notes": task.notes},
        "seconds": seconds,
    }
    summary = _finite(summary)
    json_path = config.out / JSON_NAME.format(data=config.data)
    json_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                         encoding="utf-8")
    echo(f"[4/4] wrote {png} and {json_path}")
    for note in task.notes:
        echo(f"      note: {note}")
    echo(f"done in {seconds['total']:.0f} s (train {seconds['train']:.0f} s, bank {seconds['bank']:.0f} s, "
         f"generate {seconds['generate']:.0f} s, figure {seconds['render']:.0f} s)")
    return summary
