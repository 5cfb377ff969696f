"""ShapesDataset: the built-in demo data, procedurally drawn shapes with captions.

Each sample is an RGB image of one coloured shape (circle, square, triangle, cross,
diamond, ring) in one of six positions (top/bottom x left/centre/right) on a plain or
noisy grey background, paired with a caption that says the colour, the shape and the
position ("a red circle at the top left"), and with the caption's bag-of-words vector,
so the teacher modality needs no language model. Nothing is downloaded; 2,000 images of
32 px are drawn in a few tens of milliseconds, all at once, with tensor operations.

Everything is determined by ``seed`` through one explicit ``torch.Generator``; the global
RNG is never used.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch.utils.data import Dataset, Subset

from ..core._validation import check_int, check_option, check_probability, fail
from ..exceptions import ValidationError
from ._paired import _as_index
from ._splits import validation_split

__all__ = ["COLOURS", "POSITIONS", "SHAPES", "VOCABULARY", "ShapesDataset", "caption_embedding"]

#: shape classes (the label is the position in this tuple)
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring")
#: colour names and their RGB values in [0, 1] (each drawn colour is jittered by +-0.05)
COLOURS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.05),
}
#: positions, row-major over (top, bottom) x (left, centre, right)
POSITIONS: Tuple[str, ...] = ("top left", "top centre", "top right",
                              "bottom left", "bottom centre", "bottom right")
_VERTICAL = ("top", "bottom")
_HORIZONTAL = ("left", "centre", "right")
#: the fixed caption vocabulary of the bag-of-words vectors (content words only:
#: "a", "at", "the" occur in every caption and carry nothing)
VOCABULARY: Tuple[str, ...] = (*COLOURS, *SHAPES, *_VERTICAL, *_HORIZONTAL)
_WORD_INDEX = {word: i for i, word in enumerate(VOCABULARY)}
BACKGROUNDS = ("mixed", "plain", "noisy")

_COLOUR_JITTER = 0.05
_RADIUS = (0.11, 0.15)  # shape half-size, as a fraction of the image size
_CENTRE_JITTER = 0.015  # fraction of the image size
_GREY = (0.05, 0.35)
_TINT = 0.04
_NOISE = 0.05
_CHUNK = 1024  # samples per masking step


def caption_embedding(caption: str) -> torch.Tensor:
    """The L2-normalised bag-of-words vector of ``caption`` over :data:`VOCABULARY`.

    Words outside the vocabulary are ignored; a caption without any known word gives
    the zero vector (never NaN).

    Examples:
        >>> v = caption_embedding("a red circle at the top left")
        >>> [VOCABULARY[i] for i in v.nonzero().flatten().tolist()], round(float(v.norm()), 4)
        (['red', 'circle', 'top', 'left'], 1.0)
    """
    if not isinstance(caption, str):
        fail("caption", "a string", caption)
    counts = torch.zeros(len(VOCABULARY), dtype=torch.float32)
    for word in caption.lower().replace(",", " ").replace(".", " ").split():
        if word in _WORD_INDEX:
            counts[_WORD_INDEX[word]] += 1.0
    norm = counts.norm()
    return counts / norm if norm > 0 else counts


def _masks(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``[len(SHAPES), n, H, W]`` masks of every shape; dx, dy in shape half-size units."""
    ax, ay = dx.abs(), dy.abs()
    radius2 = dx * dx + dy * dy
    return torch.stack([
        radius2 <= 1.0,                                                     # circle
        torch.maximum(ax, ay) <= 0.82,                                      # square
        (dy <= 0.8) & (dy >= -1.0) & (ax <= (dy + 1.0) / 1.8),              # triangle (apex up)
        ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0)),          # cross
        ax + ay <= 1.1,                                                     # diamond
        (radius2 <= 1.0) & (radius2 >= 0.55 ** 2),                          # ring
    ])


class ShapesDataset(Dataset):
    """Coloured shapes with captions: a paired image-text dataset with no download.

    Args:
        n: number of samples.
        image_size: height and width of the images (>= 8).
        seed: the seed of the one ``torch.Generator`` that draws everything.
        background: ``"mixed"`` (half plain, half noisy), ``"plain"`` or ``"noisy"``.

    Samples are dicts ``{"image": float32 [3, S, S] in [0, 1], "caption": str,
    "text": float32 [len(VOCABULARY)] bag of words, "label": int (shape class),
    "colour": str, "shape": str, "position": str}``.

    Attributes:
        images: ``[n, 3, S, S]`` float32.
        texts: ``[n, len(VOCABULARY)]`` float32, ``texts[i] == caption_embedding(captions[i])``.
        captions: the n captions.
        labels, colour_labels, position_labels: ``[n]`` int64 indices into ``classes``,
            ``colour_names``, ``position_names``.
        noisy: ``[n]`` bool, True where the background is noisy.
        centres: ``[n, 2]`` float32 shape centre (row, column) in pixels.
        radii: ``[n]`` float32 shape half-size in pixels.
        classes, colour_names, position_names, vocabulary, palette: the fixed tables.

    Examples:
        >>> ds = ShapesDataset(n=12, image_size=16, seed=0)
        >>> sample = ds[0]
        >>> tuple(sample["image"].shape), sample["text"].shape[0] == len(ds.vocabulary)
        ((3, 16, 16), True)
        >>> sample["caption"] == f"a {sample['colour']} {sample['shape']} at the {sample['position']}"
        True
        >>> ds.classes[sample["label"]] == sample["shape"]
        True
        >>> bool((ShapesDataset(n=12, image_size=16, seed=0).images == ds.images).all())
        True
    """

    classes: List[str] = list(SHAPES)
    colour_names: List[str] = list(COLOURS)
    position_names: List[str] = list(POSITIONS)
    vocabulary: List[str] = list(VOCABULARY)
    palette: Dict[str, Tuple[float, float, float]] = dict(COLOURS)

    def __init__(self, n: int = 2000, image_size: int = 32, seed: int = 0, *,
                 background: str = "mixed") -> None:
        self.n = check_int("n", n, minimum=1)
        self.image_size = check_int("image_size", image_size, minimum=8)
        if isinstance(seed, bool) or not isinstance(seed, int):
            fail("seed", "an integer", seed, ValidationError)
        self.seed = seed
        self.background = check_option("background", background, BACKGROUNDS)
        self._generate()

    # ------------------------------------------------------------------ drawing
    def _generate(self) -> None:
        n, size = self.n, self.image_size
        g = torch.Generator().manual_seed(self.seed)

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return low + (high - low) * torch.rand(*shape, generator=g)

        # attributes: shapes balanced over classes, colours and positions uniform
        shape = (torch.arange(n) % len(SHAPES))[torch.randperm(n, generator=g)]
        colour = torch.randint(len(COLOURS), (n,), generator=g)
        position = torch.randint(len(POSITIONS), (n,), generator=g)
        vertical, horizontal = position // 3, position % 3
        centre_y = (0.25 + 0.5 * vertical.float() + uniform(-_CENTRE_JITTER, _CENTRE_JITTER, n)) * size
        centre_x = (1 / 6 + horizontal.float() / 3 + uniform(-_CENTRE_JITTER, _CENTRE_JITTER, n)) * size
        radius = uniform(*_RADIUS, n) * size
        if self.background == "mixed":
            noisy = torch.rand(n, generator=g) < 0.5
        else:
            noisy = torch.full((n,), self.background == "noisy")
        grey = uniform(*_GREY, n, 1) + uniform(-_TINT, _TINT, n, 3)
        noise = torch.randn(n, 3, size, size, generator=g) * _NOISE
        palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
        fill = (palette[colour] + uniform(-_COLOUR_JITTER, _COLOUR_JITTER, n, 3)).clamp(0.0, 1.0)

        # masks: pixel centres in shape half-size units, all shapes at once, pick one
        coords = torch.arange(size, dtype=torch.float32) + 0.5
        mask = torch.empty(n, size, size, dtype=torch.bool)
        for start in range(0, n, _CHUNK):  # bounded memory for large n or image_size
            part = slice(start, min(start + _CHUNK, n))
            k = part.stop - part.start
            r = radius[part].view(k, 1, 1)
            dy = (coords.view(1, size, 1) - centre_y[part].view(k, 1, 1)) / r
            dx = (coords.view(1, 1, size) - centre_x[part].view(k, 1, 1)) / r
            choice = shape[part].view(1, k, 1, 1).expand(1, k, size, size)
            mask[part] = _masks(dx, dy).gather(0, choice)[0]

        backdrop = grey.clamp(0.0, 1.0).view(n, 3, 1, 1).expand(n, 3, size, size)
        backdrop = (backdrop + noise * noisy.view(n, 1, 1, 1)).clamp(0.0, 1.0)
        self.images = torch.where(mask.unsqueeze(1), fill.view(n, 3, 1, 1), backdrop).contiguous()

        self.labels = shape
        self.colour_labels = colour
        self.position_labels = position
        self.noisy = noisy
        self.centres = torch.stack([centre_y, centre_x], dim=1)
        self.radii = radius
        self.captions = [f"a {self.colour_names[c]} {SHAPES[s]} at the {POSITIONS[p]}"
                         for c, s, p in zip(colour.tolist(), shape.tolist(), position.tolist())]
        # bag of words straight from the attribute indices (equals caption_embedding)
        texts = torch.zeros(n, len(VOCABULARY))
        rows = torch.arange(n)
        offset = len(COLOURS)
        texts[rows, colour] = 1.0
        texts[rows, offset + shape] = 1.0
        offset += len(SHAPES)
        texts[rows, offset + vertical] = 1.0
        texts[rows, offset + len(_VERTICAL) + horizontal] = 1.0
        self.texts = texts / 2.0  # four words, each once: L2 norm 2

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self.n

    @property
    def num_classes(self) -> int:
        """Number of shape classes."""
        return len(self.classes)

    def __getitem__(self, i: Any) -> Dict[str, Any]:
        position = _as_index(i, self.n)
        return {
            "image": self.images[position],
            "caption": self.captions[position],
            "text": self.texts[position],
            "label": int(self.labels[position]),
            "colour": self.colour_names[int(self.colour_labels[position])],
            "shape": self.classes[int(self.labels[position])],
            "position": self.position_names[int(self.position_labels[position])],
        }

    def features(self, modality: str) -> torch.Tensor:
        """All ``"image"`` (``[n, 3, S, S]``) or ``"text"`` (``[n, V]``) data at once."""
        if modality == "image":
            return self.images
        if modality == "text":
            return self.texts
        fail("modality", "one of 'image', 'text'", modality)

    def train_test_split(self, test_fraction: float = 0.2, seed: int = 0) -> Tuple[Subset, Subset]:
        """A stratified (by shape) split into two ``torch.utils.data.Subset``.

        Examples:
            >>> train, test = ShapesDataset(n=60, image_size=16).train_test_split(0.25)
            >>> len(train), len(test)
            (45, 15)
        """
        fraction = check_probability("test_fraction", test_fraction)
        if not 0.0 < fraction < 1.0:
            fail("test_fraction", "a number in (0, 1)", test_fraction)
        train, test = validation_split(list(range(self.n)), self.labels, fraction=fraction, seed=seed)
        return Subset(self, train.tolist()), Subset(self, test.tolist())

    def __repr__(self) -> str:
        return (f"ShapesDataset(n={self.n}, image_size={self.image_size}, seed={self.seed}, "
                f"background={self.background!r})")
