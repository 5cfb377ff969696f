"""``persistent_workers=True``: PyTorch changes the sample order, the CMDA mixing stays the same.

The FAQ entry (docs/mixup-faq.md, "Why do the batches change with persistent_workers?") says:
with ``shuffle=True`` the order of epochs after the first differs between
``persistent_workers=True`` and ``False`` (PyTorch draws a new base seed for the workers from
the loader's generator each time it starts them, and persistent workers are started once), and
the mixing of a batch depends only on ``(seed, epoch, rank, the batch's dataset indices)``, so
for the same order both settings give the same mixed batches. These tests check both sentences
with real DataLoaders and two worker processes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler

from cmda_data import CMDACollate, EmbeddingBank, IndexedDataset
from cmda_data.datasets import ShapesDataset

N, BATCH, EPOCHS = 32, 8, 3


@pytest.fixture(scope="module")
def setup():
    data = ShapesDataset(n=N, image_size=8)
    noise = 0.1 * torch.randn(data.texts.shape, generator=torch.Generator().manual_seed(0))
    z = {"image": F.normalize(data.texts + noise, dim=1), "text": F.normalize(data.texts, dim=1)}
    bank = EmbeddingBank.from_embeddings(z, student="image", teachers="text", n_components=2)
    return IndexedDataset(data), bank, data.num_classes


def _collate(bank, num_classes):
    return CMDACollate(bank, target="label", num_classes=num_classes, p=0.5, seed=0)


def _epochs(indexed, bank, num_classes, *, persistent, num_workers=2, own_sampler=False):
    """``EPOCHS`` epochs of a shuffled loader with a seeded generator: per epoch, the list of batches."""
    collate = _collate(bank, num_classes)
    if own_sampler:  # the sampler draws from its own generator: the order does not depend on the workers
        order = {"sampler": RandomSampler(indexed, generator=torch.Generator().manual_seed(0))}
    else:            # shuffle=True: the sampler and the workers' base seed share the loader's generator
        order = {"shuffle": True, "generator": torch.Generator().manual_seed(0)}
    loader = DataLoader(indexed, batch_size=BATCH, collate_fn=collate, num_workers=num_workers,
                        persistent_workers=persistent and num_workers > 0, **order)
    epochs = []
    for epoch in range(EPOCHS):
        collate.set_epoch(epoch)
        epochs.append([{"image": b["image"], "label": b["label"], **b["mix_info"]} for b in loader])
    return epochs


def _order(epoch):
    return torch.cat([b["index"] for b in epoch]).tolist()


def _by_index(epoch, key):
    """``key`` of the mix record of each dataset index, in index order."""
    index = torch.cat([b["index"] for b in epoch])
    return torch.cat([b[key] for b in epoch])[index.argsort()]


def _check_against_reference(epochs, indexed, bank, num_classes):
    """Every batch equals what CMDACollate makes in this process of the same indices at that epoch."""
    reference = _collate(bank, num_classes)
    for epoch, batches in enumerate(epochs):
        reference.set_epoch(epoch)
        for batch in batches:
            ref = reference([indexed[int(i)] for i in batch["index"]])
            for key in ("partners", "mixed", "teacher"):
                assert torch.equal(batch[key], ref["mix_info"][key]), (epoch, key)
            torch.testing.assert_close(batch["weights"], ref["mix_info"]["weights"])
            torch.testing.assert_close(batch["image"], ref["image"])
            torch.testing.assert_close(batch["label"], ref["label"])


def test_pytorch_shuffles_differently_with_persistent_workers(setup):
    """PyTorch's behaviour (the FAQ's claim): the same seeded shuffle, another order from the second epoch on."""
    indexed, bank, num_classes = setup
    plain = _epochs(indexed, bank, num_classes, persistent=False)
    persistent = _epochs(indexed, bank, num_classes, persistent=True)
    assert _order(plain[0]) == _order(persistent[0])
    assert all(_order(plain[e]) != _order(persistent[e]) for e in range(1, EPOCHS))
    for epochs in (plain, persistent):  # each batch is still mixed as its indices and epoch say
        assert all(sorted(_order(e)) == list(range(N)) for e in epochs)
        _check_against_reference(epochs, indexed, bank, num_classes)


def test_mixing_is_the_same_with_and_without_persistent_workers_for_the_same_order(setup):
    indexed, bank, num_classes = setup
    runs = {name: _epochs(indexed, bank, num_classes, own_sampler=True, **kwargs)
            for name, kwargs in {"plain": {"persistent": False}, "persistent": {"persistent": True},
                                 "main process": {"persistent": False, "num_workers": 0}}.items()}
    plain, persistent = runs["plain"], runs["persistent"]
    for epoch in range(EPOCHS):
        assert _order(plain[epoch]) == _order(persistent[epoch]) == _order(runs["main process"][epoch])
        for a, b, c in zip(plain[epoch], persistent[epoch], runs["main process"][epoch]):
            for key in a:  # two worker runs: bit for bit; the main process: the same draws, same values
                assert torch.equal(a[key], b[key]), (epoch, key)
                torch.testing.assert_close(a[key], c[key])
    # set_epoch reached the persistent workers: the epochs draw differently (same indices, new mixes)
    mixed = [_by_index(epoch, "mixed") for epoch in persistent]
    assert all(not torch.equal(mixed[0], mixed[e]) for e in range(1, EPOCHS))
    _check_against_reference(persistent, indexed, bank, num_classes)
