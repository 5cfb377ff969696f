"""PairedFeatureDataset: row-aligned image/text pairs as a small map-style dataset (private).

Both real data sets (Wikipedia, Web News) are tables of N pairs in the official row order
(train rows, then test rows). A loader returns one split of that table; each sample keeps
its row in the full table as ``"row"``, so precomputed embeddings, banks and splits
built on the full table can be looked up from any split.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core._validation import check_same_size, describe, fail
from ..exceptions import ShapeError

__all__ = ["PairedFeatureDataset"]


def _as_index(i: Any, length: int) -> int:
    if isinstance(i, torch.Tensor) and i.ndim == 0 and not i.is_floating_point():
        i = int(i)
    if isinstance(i, np.integer):
        i = int(i)
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"index: expected an integer, got {describe(i)}")
    if not -length <= i < length:
        raise IndexError(f"index: expected an integer in [-{length}, {length}), got {i}")
    return i % length if length else i


class PairedFeatureDataset(Dataset):
    """Paired samples ``{"image", "text", "label", "row", ...}`` of one split.

    Args:
        image: ``[n, d_image]`` float32 image features, or ``None`` when a subclass
            produces images itself (see :meth:`image_at`).
        text: ``[n, d_text]`` float32 text features (the teacher modality by default).
        labels: ``[n]`` int64 class ids.
        rows: ``[n]`` int64 row of each sample in the full table (default ``arange(n)``).
        is_train: ``[n]`` booleans, True for rows of the official train split.
        class_names: one name per class.
        text_ids: optional ``[n]`` text ids (file stems), added to samples as ``"text_id"``.
        captions: optional ``[n]`` raw texts, added to samples as ``"caption"``.
        name: the data set's name (for ``repr``).
        split: ``"train"``, ``"test"`` or ``"all"`` (for ``repr``).

    Attributes:
        image, text: the feature tensors (``image`` is None for decoded photos).
        labels, rows, is_train: per-sample tensors.
        class_names, text_ids, captions: per-class / per-sample lists.

    Examples:
        >>> ds = PairedFeatureDataset(torch.zeros(3, 4), torch.ones(3, 2), torch.tensor([0, 1, 1]),
        ...                           class_names=["a", "b"], text_ids=["x", "y", "z"])
        >>> len(ds), ds.num_classes, ds.dims
        (3, 2, {'image': 4, 'text': 2})
        >>> sample = ds[2]
        >>> sample["image"].shape, sample["text"].tolist(), sample["label"], sample["row"], sample["text_id"]
        (torch.Size([4]), [1.0, 1.0], 1, 2, 'z')
        >>> len(ds.subset([0, 2]))
        2
    """

    def __init__(self, image: Optional[torch.Tensor], text: torch.Tensor, labels: torch.Tensor, *,
                 rows: Optional[torch.Tensor] = None, is_train: Optional[torch.Tensor] = None,
                 class_names: Sequence[str] = (), text_ids: Optional[Sequence[str]] = None,
                 captions: Optional[Sequence[str]] = None, name: str = "paired",
                 split: str = "all") -> None:
        n = int(labels.shape[0])
        if labels.ndim != 1:
            fail("labels", "a 1-D tensor of class ids", labels, ShapeError)
        if text.ndim != 2:
            fail("text", "a 2-D tensor [n, d] of text features", text, ShapeError)
        check_same_size("labels", n, "text", int(text.shape[0]), what="rows")
        if image is not None:
            if image.ndim != 2:
                fail("image", "a 2-D tensor [n, d] of image features", image, ShapeError)
            check_same_size("labels", n, "image", int(image.shape[0]), what="rows")
        self.image = image
        self.text = text
        self.labels = labels.to(torch.int64)
        self.rows = torch.arange(n) if rows is None else rows.to(torch.int64)
        self.is_train = torch.ones(n, dtype=torch.bool) if is_train is None else is_train.to(torch.bool)
        check_same_size("labels", n, "rows", int(self.rows.shape[0]), what="rows")
        check_same_size("labels", n, "is_train", int(self.is_train.shape[0]), what="rows")
        for field, values in (("text_ids", text_ids), ("captions", captions)):
            if values is not None:
                check_same_size("labels", n, field, len(values), what="rows")
        self.class_names: List[str] = list(class_names)
        self.text_ids: Optional[List[str]] = None if text_ids is None else list(text_ids)
        self.captions: Optional[List[str]] = None if captions is None else list(captions)
        self.name = name
        self.split = split

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (from ``class_names``, else ``max(label) + 1``)."""
        if self.class_names:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if len(self) else 0

    @property
    def classes(self) -> List[str]:
        """Alias of ``class_names`` (torchvision's name)."""
        return self.class_names

    @property
    def dims(self) -> Dict[str, int]:
        """Feature size of each modality: ``{"image": d, "text": d}`` (photos: C*H*W)."""
        if self.image is not None:
            image = int(self.image.shape[1])
        else:
            image = int(self.image_at(0).numel()) if len(self) else 0
        return {"image": image, "text": int(self.text.shape[1])}

    # ------------------------------------------------------------------ items
    def image_at(self, position: int) -> torch.Tensor:
        """The image of sample ``position`` (subclasses decode photos here)."""
        return self.image[position]

    def __getitem__(self, i: Any) -> Dict[str, Any]:
        position = _as_index(i, len(self))
        sample: Dict[str, Any] = {
            "image": self.image_at(position),
            "text": self.text[position],
            "label": int(self.labels[position]),
            "row": int(self.rows[position]),
        }
        if self.text_ids is not None:
            sample["text_id"] = self.text_ids[position]
        if self.captions is not None:
            sample["caption"] = self.captions[position]
        return sample

    def features(self, modality: str) -> torch.Tensor:
        """All features of ``"image"`` or ``"text"`` as one ``[n, d]`` tensor."""
        if modality == "text":
            return self.text
        if modality == "image" and self.image is not None:
            return self.image
        if modality == "image":
            return torch.stack([self.image_at(p) for p in range(len(self))])
        fail("modality", "one of 'image', 'text'", modality)

    # ------------------------------------------------------------------ subsets
    def _take(self, values: Optional[Sequence[Any]], positions: List[int]) -> Optional[List[Any]]:
        return None if values is None else [values[p] for p in positions]

    def subset(self, positions: Any, *, split: Optional[str] = None) -> "PairedFeatureDataset":
        """A dataset of the samples at ``positions`` (positions in *this* dataset)."""
        if isinstance(positions, torch.Tensor):
            positions = positions.tolist()
        positions = [_as_index(p, len(self)) for p in positions]
        index = torch.as_tensor(positions, dtype=torch.int64)
        return PairedFeatureDataset(
            None if self.image is None else self.image[index], self.text[index], self.labels[index],
            rows=self.rows[index], is_train=self.is_train[index], class_names=self.class_names,
            text_ids=self._take(self.text_ids, positions), captions=self._take(self.captions, positions),
            name=self.name, split=split or self.split)

    def __repr__(self) -> str:
        dims = {"image": int(self.image.shape[1])} if self.image is not None else {}
        dims["text"] = int(self.text.shape[1])
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.num_classes}, dims={dims})")
