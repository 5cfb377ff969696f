"""The data-set specific parts of ``cmda demo`` (private): data, encoders, figure.

One :class:`DemoTask` per ``--data`` choice:

* ``shapes``: the built-in :class:`~cmda_data.datasets.ShapesDataset` (32 px images with
  captions); a tiny CNN encodes the image, the caption's bag-of-words vector goes through
  an MLP head. The figure shows the mixed images.
* ``wikipedia``: :func:`~cmda_data.datasets.load_wikipedia`; the student is the 128-d SIFT
  vector of the image (no pixels), so the figure is a table of classes and weights.
* ``webnews``: :func:`~cmda_data.datasets.load_webnews`; the aligner and the bank use the
  precomputed photo features, the mixing uses the decoded photos (same rows), and the
  figure shows the mixed photos with the Chinese captions (or, without a CJK font, the
  text id and class).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..aligners import ContrastiveAligner
from ..core._validation import fail
from ..datasets import ShapesDataset, load_webnews, load_wikipedia, wikipedia_article
from ..exceptions import ShapeError
from ._grid import GridRow, Partner, TableRow, find_cjk_font, render_mix_grid, render_mix_table

__all__ = ["DemoTask", "load_task"]


@dataclass
class DemoTask:
    """Everything :func:`cmda_data.demo._job.run_demo` needs for one data set."""

    description: str
    aligner: Any
    aligner_text: str
    encoder_text: Dict[str, str]
    epochs: int
    batch_size: int
    lr: float
    train_columns: Dict[str, torch.Tensor]
    heldout_columns: Dict[str, torch.Tensor]
    heldout_keys: torch.Tensor
    key_word: str
    student_word: str
    bank_dataset: Any
    mix_dataset: Any
    num_classes: int
    agreement_keys: Dict[str, torch.Tensor]
    render: Callable[[Any, Path, int], Path]
    generate_limit: Optional[int] = None
    bank_options: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def train_size(self) -> int:
        return len(self.train_columns["text"])


class _ShapeAndPlace(nn.Module):
    """Global max pool (what is there, anywhere) + a 2 x 3 average pool (where it is)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        what = torch.amax(x, dim=(2, 3))
        where = nn.functional.adaptive_avg_pool2d(x, (2, 3)).flatten(1)
        return torch.cat([what, where], dim=1)


def tiny_cnn(seed: int) -> nn.Module:
    """A small CNN for 32 px RGB images -> 224 features (what: max pool, where: 2 x 3 grid).

    Initialised from ``seed`` without touching the global RNG.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), _ShapeAndPlace())


def _rows_to_show(total: int, rows: int) -> List[int]:
    """``rows`` positions spread evenly over ``total`` items (diverse, deterministic)."""
    rows = min(rows, total)
    return sorted({round(i * (total - 1) / max(1, rows - 1)) for i in range(rows)}) if rows > 1 else [0]


def _partners(item: Dict[str, Any]) -> List[tuple]:
    """``(dataset index, weight)`` of an item's partners with weight > 0, heaviest first."""
    info = item["mix_info"]
    pairs = [(int(j), float(w)) for j, w in zip(info["partners"], info["weights"]) if float(w) > 0]
    return sorted(pairs, key=lambda pair: -pair[1])


def _subsample(n: Optional[int], total: int, seed: int) -> Optional[List[int]]:
    """Sorted random positions of ``n`` samples out of ``total`` (None: keep them all)."""
    if n is None or n >= total:
        return None
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return sorted(order.tolist())


# ---------------------------------------------------------------------------------- shapes
def _shapes(config: Any) -> DemoTask:
    n = config.n or 2000
    data = ShapesDataset(n=n, image_size=32, seed=config.seed)
    train, held = data.train_test_split(0.2, seed=config.seed)
    ti, hi = torch.tensor(train.indices), torch.tensor(held.indices)
    aligner = ContrastiveAligner({"image": tiny_cnn(config.seed), "text": nn.Identity()}, dim=32, tau=0.1,
                                 head_hidden=(64,), seed=config.seed)
    n_shapes, n_positions = len(data.classes), len(data.position_names)
    caption_id = (data.colour_labels * n_shapes + data.labels) * n_positions + data.position_labels

    def render(aug: Any, path: Path, rows: int) -> Path:
        shown = []
        for position in _rows_to_show(len(aug), rows):
            item = aug[position]
            guide = train[position]
            partners = []
            for j, w in _partners(item)[:config.top_k]:
                other = train[j]
                same = other["shape"] == guide["shape"] and other["colour"] == guide["colour"]
                partners.append(Partner(w, other["caption"], other["image"], same))
            shown.append(GridRow(item["image"], guide["caption"], partners))
        title = ("CMDA on the built-in shapes (teacher: caption, student: 32x32 image)\n"
                 "Each generated image (left, blue frame) is the weighted mix of its partners (right); the "
                 "teacher caption above the row chose the partners and their weights.")
        return render_mix_grid(shown, path, title=title, footnote="partner captions in green share the guiding "
                               "caption's colour and shape; grey ones do not")

    return DemoTask(
        description=f"ShapesDataset (built in, no download): {n} image-caption pairs, {len(ti)} train / "
                    f"{len(hi)} held out",
        aligner=aligner, aligner_text="tiny CNN for 32x32 images + MLP head for bag-of-words captions",
        encoder_text={"image": "tiny CNN (3 conv layers) + MLP head", "text": "bag of words + MLP head"},
        epochs=config.epochs or 10, batch_size=128, lr=0.05,
        train_columns={"image": data.images[ti], "text": data.texts[ti]},
        heldout_columns={"image": data.images[hi], "text": data.texts[hi]}, heldout_keys=caption_id[hi],
        key_word="same caption", student_word="image", bank_dataset=train, mix_dataset=train,
        num_classes=data.num_classes,
        agreement_keys={"shape": data.labels[ti], "colour": data.colour_labels[ti]}, render=render)


# ---------------------------------------------------------------------------------- real data
#: GMM of the real data banks: on the first 16 principal components of the 64-d latents
#: (a full-covariance GMM in 64 dims has 2,000+ parameters per component, so BIC picks M = 1)
REAL_BANK_OPTIONS = {"reduce_dim": 16, "candidates": range(1, 11)}

def _feature_aligner(config: Any, image_dim: int, text_dim: int) -> Any:
    # BatchNorm without affine parameters standardises the raw features (no random init)
    return ContrastiveAligner({"image": nn.BatchNorm1d(image_dim, affine=False),
                               "text": nn.BatchNorm1d(text_dim, affine=False)}, dim=64, tau=0.2,
                              head_hidden=(256,), seed=config.seed)


def _short_id(text_id: str) -> str:
    """``'00565641497ba8b5...-2'`` -> ``'005656-2'``: short, but sections of one article stay apart."""
    stem, dash, section = text_id.partition("-")
    return stem[:6] + (dash + section if dash else "")


def _wikipedia(config: Any) -> DemoTask:
    train, test = load_wikipedia(split="train"), load_wikipedia(split="test")
    keep = _subsample(config.n, len(train), config.seed)
    if keep is not None:
        train = train.subset(keep)
    names = train.class_names

    def render(aug: Any, path: Path, rows: int) -> Path:
        shown = []
        for position in _rows_to_show(len(aug), rows):
            item = aug[position]
            label = int(train.labels[position])
            partners = [Partner(w, f"{names[int(train.labels[j])]} ({_short_id(train.text_ids[j])})", None,
                                int(train.labels[j]) == label) for j, w in _partners(item)[:config.top_k]]
            text = wikipedia_article(train.text_ids[position])
            shown.append(TableRow(f"{names[label]}  (article {_short_id(train.text_ids[position])})", text, partners))
        title = ("CMDA on Wikipedia (teacher: article text, student: 128-d SIFT image feature)\n"
                 "Each row is one generated image feature vector (nothing to look at): the weighted mix of the "
                 "partners on the right, which the article on the left chose and weighted.")
        return render_mix_table(shown, path, title=title,
                                footnote="partner classes in green match the guiding article's class; grey do not")

    return DemoTask(
        description=f"Wikipedia ({len(train)} train / {len(test)} test pairs; student: 128-d SIFT image features, "
                    f"teacher: MiniLM article embeddings)",
        aligner=_feature_aligner(config, train.dims["image"], train.dims["text"]),
        bank_options=REAL_BANK_OPTIONS,
        aligner_text="standardised SIFT vectors and MiniLM embeddings, MLP heads",
        encoder_text={"image": "SIFT-128 + BatchNorm1d (standardise) + MLP head",
                      "text": "MiniLM-384 + BatchNorm1d + MLP head"},
        epochs=config.epochs or 30, batch_size=128, lr=0.05,
        train_columns={"image": train.image, "text": train.text},
        heldout_columns={"image": test.image, "text": test.text}, heldout_keys=test.labels,
        key_word="same class", student_word="image", bank_dataset=train, mix_dataset=train,
        num_classes=train.num_classes, agreement_keys={"class": train.labels}, render=render,
        notes=["the student is a SIFT feature vector, so the figure is a table of classes and weights"])


def _webnews(config: Any) -> DemoTask:
    train, test = load_webnews(split="train"), load_webnews(split="test", captions=False)
    photos = load_webnews(image="pixels", image_size=64, split="train", cache=True)
    keep = _subsample(config.n, len(train), config.seed)
    if keep is not None:
        train, photos = train.subset(keep), photos.subset(keep)
    if not bool(torch.equal(train.rows, photos.rows)):
        fail("webnews photos", "the same rows as the webnews features", "different rows", ShapeError, raw=True)
    names = train.class_names
    font = find_cjk_font()
    notes = [] if font else ["no installed font has Chinese glyphs, so captions are shown as text id + class "
                             "(install a CJK font such as fonts-noto-cjk to see them)"]

    def words(position: int, width: int) -> str:
        label = names[int(train.labels[position])]
        if font is None:
            return f"text {train.text_ids[position]} ({label})"
        caption = " ".join(train.captions[position].split())
        return f"{caption[:width]}{'...' if len(caption) > width else ''} ({label})"

    def render(aug: Any, path: Path, rows: int) -> Path:
        shown = []
        for position in _rows_to_show(len(aug), rows):
            item = aug[position]
            label = int(train.labels[position])
            partners = [Partner(w, words(j, 18), photos[j]["image"], int(train.labels[j]) == label)
                        for j, w in _partners(item)[:config.top_k]]
            shown.append(GridRow(item["image"], words(position, 40), partners))
        title = ("CMDA on Web News (teacher: caption, student: 64x64 photo)\n"
                 "Each generated photo (left, blue frame) is the weighted mix of its partners (right); the caption "
                 "above the row chose the partners and their weights.")
        footnote = "partners in green have the guiding caption's class; grey ones do not"
        if font is None:
            footnote += " (no CJK font installed: captions are shown as text id + class)"
        return render_mix_grid(shown, path, title=title, font_file=font, footnote=footnote)

    return DemoTask(
        description=f"Web News ({len(train)} train / {len(test)} test pairs; aligner on EfficientNet photo "
                    f"features and e5 caption embeddings, mixing the 64x64 photos)",
        aligner=_feature_aligner(config, train.dims["image"], train.dims["text"]),
        bank_options=REAL_BANK_OPTIONS,
        aligner_text="standardised EfficientNet photo features and e5 caption embeddings, MLP heads",
        encoder_text={"image": "EfficientNet-Lite0 features + BatchNorm1d + MLP head",
                      "text": "e5 embedding + BatchNorm1d + MLP head"},
        epochs=config.epochs or 30, batch_size=128, lr=0.05,
        train_columns={"image": train.image, "text": train.text},
        heldout_columns={"image": test.image, "text": test.text}, heldout_keys=test.labels,
        key_word="same class", student_word="photo", bank_dataset=train, mix_dataset=photos,
        num_classes=train.num_classes, agreement_keys={"class": train.labels}, render=render, notes=notes)


def load_task(config: Any) -> DemoTask:
    """The :class:`DemoTask` of ``config.data``."""
    return {"shapes": _shapes, "wikipedia": _wikipedia, "webnews": _webnews}[config.data](config)
