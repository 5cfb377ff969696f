"""Small real datasets and banks shared by the entry-point tests (bank, dataset, collate, module).

Classes live at module level so DataLoader worker processes can import them.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from cmda_data.bank import EmbeddingBank

NUM_CLASSES = 5


class PairedDataset(Dataset):
    """``N`` dict samples: a 3x4x4 image, a 6-d text feature, a class label and a caption string.

    Images of one class share a mean, and the bank below uses latents aligned with the
    labels, so the mixing weights have structure.
    """

    def __init__(self, n: int = 24, seed: int = 0, image_shape=(3, 4, 4)) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = [i % NUM_CLASSES for i in range(n)]
        self.images = torch.randn(n, *image_shape, generator=g) + torch.tensor(self.labels).float().view(
            n, *([1] * len(image_shape)))
        self.texts = torch.randn(n, 6, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "text": self.texts[i], "label": self.labels[i], "caption": f"sample {i}"}


class TupleDataset(PairedDataset):
    """The same samples as tuples ``(image, text, label)``."""

    def __getitem__(self, i: int) -> tuple:
        return (self.images[i], self.texts[i], self.labels[i])


class TokenDataset(PairedDataset):
    """Samples whose ``tokens`` field holds integer token ids (never mixable)."""

    def __getitem__(self, i: int) -> dict:
        return {"tokens": torch.arange(5) + i, "label": self.labels[i]}


class CountingDataset(Dataset):
    """Records every index read (to check that only the needed partners are fetched)."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner
        self.reads: list = []

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        self.reads.append(int(i))
        return self.inner[i]


class ValueOfBank(Dataset):
    """Item i returns ``bank.embeddings[student][i, 0]`` read in the worker, and whether it is shared."""

    def __init__(self, bank: EmbeddingBank, n: int = 4) -> None:
        self.bank, self.n = bank, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        table = self.bank.embeddings[self.bank.student]
        return table[i, 0].clone(), torch.tensor(table.is_shared())


def latents(n: int = 24, d: int = 8, seed: int = 1, teachers: int = 1) -> dict:
    """Unit latents: image and ``teachers`` teacher modalities near a per-class direction."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, d, generator=g)
    labels = torch.tensor([i % NUM_CLASSES for i in range(n)])
    out = {"image": torch.nn.functional.normalize(centres[labels] + 0.7 * torch.randn(n, d, generator=g), dim=1)}
    for t in range(teachers):
        name = "text" if t == 0 else f"teacher{t}"
        out[name] = torch.nn.functional.normalize(centres[labels] + 0.7 * torch.randn(n, d, generator=g), dim=1)
    return out


def make_bank(n: int = 24, teachers: int = 1, **options) -> EmbeddingBank:
    z = latents(n, teachers=teachers)
    options.setdefault("n_components", 2)
    names = [m for m in z if m != "image"]
    return EmbeddingBank.from_embeddings(z, student="image", teachers=names, **options)


def student_of(dataset, i: int, field="image") -> torch.Tensor:
    return dataset[i][field]


def batches_per_p(entry, loader, schedule) -> dict:
    """``{p: list(loader)}``, calling ``entry.set_epoch(epoch)`` and ``entry.set_p(p)`` before each pass."""
    seen = {}
    for epoch, p in enumerate(schedule):
        entry.set_epoch(epoch)
        entry.set_p(p)
        assert entry.p == p
        seen[p] = list(loader)
    return seen
