"""The dataset's epoch order, its block pools and PoolOrderSampler (one read per item).

References: scipy's chi-square test for the uniformity of the order and of the pools; the
wrapper's own one-item-at-a-time path for the values loaded through the sampler; a counting
dataset behind a real 2-worker DataLoader for the reads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _entry_data import NUM_CLASSES, CountingDataset, PairedDataset, make_bank
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from torch.utils.data import DataLoader

from cmda_data import MixOptions
from cmda_data.augment.dataset import CrossModalAugmentedDataset, PoolOrderSampler
from cmda_data.core._seeding import draw_pools, epoch_order
from cmda_data.exceptions import CMDAError

N = 24


@pytest.fixture(scope="module")
def data():
    return PairedDataset(N)


@pytest.fixture(scope="module")
def bank():
    return make_bank(N)


# -- the epoch order ---------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(-2**63, 2**63 - 1), epoch=st.integers(0, 10**6))
def test_epoch_order_is_a_permutation_and_inverse_undoes_it(n, seed, epoch):
    position = epoch_order(np.arange(n), n=n, seed=seed, epoch=epoch)
    assert np.array_equal(np.sort(position), np.arange(n))
    assert np.array_equal(epoch_order(position, n=n, seed=seed, epoch=epoch, inverse=True), np.arange(n))
    some = np.arange(n)[::7]  # asked in any order and any number: the same values
    assert np.array_equal(epoch_order(some[::-1], n=n, seed=seed, epoch=epoch), position[some[::-1]])


def test_epoch_order_changes_with_seed_and_epoch_only():
    base = epoch_order(np.arange(50), n=50, seed=1, epoch=2)
    assert np.array_equal(base, epoch_order(np.arange(50), n=50, seed=1, epoch=2))
    assert not np.array_equal(base, epoch_order(np.arange(50), n=50, seed=1, epoch=3))
    assert not np.array_equal(base, epoch_order(np.arange(50), n=50, seed=2, epoch=2))


@pytest.mark.parametrize("n", [2, 7, 16, 100])
def test_epoch_order_positions_are_uniform(n):
    # where index 0 and index n - 1 land, over 300 * n epochs: every position equally often
    epochs = 300 * n
    for index in (0, n - 1):
        seen = [int(epoch_order([index], n=n, seed=5, epoch=e)[0]) for e in range(epochs)]
        assert chisquare(np.bincount(seen, minlength=n)).pvalue > 1e-4


def test_pool_partners_are_uniform_over_the_other_samples():
    # item 0's pool of 4 (itself included) over 3000 epochs: each other sample is in it 3/11 of the time
    n, size, epochs = 12, 4, 3000
    counts = np.zeros(n)
    for epoch in range(epochs):
        pool = draw_pools([0], seed=3, epoch=epoch, n=n, size=size, include_self=True)[0].numpy()
        assert 0 in pool and len(set(pool.tolist())) == size
        counts[pool] += 1
    assert counts[0] == epochs
    assert chisquare(counts[1:]).pvalue > 1e-4


@pytest.mark.parametrize("n,size", [(5, 2), (8, 2), (64, 4)])
def test_every_row_shares_its_pool_uniformly(n, size):
    # for every row: how often each other sample is in its pool, over 2000 epochs (a biased order fails here)
    epochs = 2000
    together = np.zeros((n, n))
    for epoch in range(epochs):
        pools = draw_pools(range(n), seed=9, epoch=epoch, n=n, size=size, include_self=True).numpy()
        rows = np.repeat(np.arange(n), size)
        np.add.at(together, (rows, pools.reshape(-1)), 1)
    for i in range(n):
        others = np.delete(together[i], i)
        assert together[i, i] == epochs and chisquare(others).pvalue > 1e-5, i


def test_large_orders_use_the_keyed_network(monkeypatch):
    import cmda_data.core._seeding as seeding

    n = 300_007  # halves of 10 bits (the network serves n > 2**21, halves of 11 bits or more)
    explicit = epoch_order(np.arange(50), n=n, seed=4, epoch=1)
    monkeypatch.setattr(seeding, "_EXPLICIT_ORDER_MAX", 0)
    position = epoch_order(np.arange(n), n=n, seed=4, epoch=1)
    assert np.array_equal(np.sort(position), np.arange(n)) and not np.array_equal(position[:50], explicit)
    assert np.array_equal(epoch_order(position, n=n, seed=4, epoch=1, inverse=True), np.arange(n))
    seen = [int(epoch_order([0], n=n, seed=4, epoch=e)[0]) * 16 // n for e in range(3000)]
    assert chisquare(np.bincount(seen, minlength=16)).pvalue > 1e-4


@pytest.mark.parametrize("n,size,include_self", [(10, 4, True), (10, 3, False), (9, 9, True), (9, 8, False),
                                                 (1, 1, True), (33, 32, True), (64, 32, True)])
def test_pools_are_the_blocks_of_the_epoch_order(n, size, include_self):
    pools = draw_pools(range(n), seed=0, epoch=4, n=n, size=size, include_self=include_self)
    order = epoch_order(np.arange(n), n=n, seed=0, epoch=4, inverse=True)
    block = size + (0 if include_self else 1)
    for i in range(n):
        pool = pools[i].tolist()
        assert pool == sorted(set(pool)) and len(pool) == size and (i in pool) == include_self
        at = int(np.nonzero(order == i)[0][0])
        start = min(at // block * block, n - block)
        assert set(pool) | {i} == set(order[start:start + block].tolist())


def test_draw_pools_rejects_a_pool_larger_than_the_data():
    with pytest.raises(CMDAError, match="size: expected a pool of at most 9 indices"):
        draw_pools([0], seed=0, epoch=0, n=10, size=10, include_self=False)


# -- the dataset and its sampler --------------------------------------------------------------
def test_pools_do_not_depend_on_the_rank_but_the_draws_do(data, bank):
    one = CrossModalAugmentedDataset(data, bank, MixOptions(rank=0, pool_size=6))
    two = CrossModalAugmentedDataset(data, bank, MixOptions(rank=1, pool_size=6))
    assert all(torch.equal(one.pool(i), two.pool(i)) for i in range(N))
    assert torch.equal(one.order(), two.order())
    assert [one[i]["mix_info"]["mixed"].item() for i in range(N)] != [two[i]["mix_info"]["mixed"].item()
                                                                        for i in range(N)]


@pytest.mark.parametrize("keep_real", [False, True])
def test_sampler_gives_every_item_once_in_the_epoch_order(data, bank, keep_real):
    aug = CrossModalAugmentedDataset(data, bank, pool_size=6, keep_real=keep_real)
    sampler = aug.sampler()
    order = list(sampler)
    assert sorted(order) == list(range(len(aug))) and len(sampler) == len(aug)
    if keep_real:  # each block: its real items, then the same items generated
        blocks = [order[at:at + 12] for at in range(0, len(order), 12)]
        assert all([i + N for i in b[:6]] == b[6:] for b in blocks)
        order = [i for b in blocks for i in b[:6]]
    assert order == aug.order().tolist()
    for at in range(0, N, 6):  # 24 = 4 whole blocks: each item's pool is its block
        assert all(set(aug.pool(i).tolist()) == set(order[at:at + 6]) for i in order[at:at + 6])
    before = list(sampler)
    sampler.set_epoch(3)  # the dataset's epoch: its draws and the order
    assert aug.epoch == 3 and list(sampler) != before and sorted(sampler) == list(range(len(aug)))
    assert aug.block_size == (12 if keep_real else 6)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_shares_the_order_between_ranks(data, bank, drop_last):
    aug = CrossModalAugmentedDataset(data, bank, pool_size=5)
    shares = [list(aug.sampler(num_replicas=5, rank=r, drop_last=drop_last)) for r in range(5)]
    assert {len(s) for s in shares} == {4 if drop_last else 5}
    flat = [i for s in shares for i in s]
    order = aug.order().tolist()
    assert flat == (order[:20] if drop_last else order + order[:1])  # consecutive shares, topped up from the start


def test_sampler_rejects_bad_arguments(data, bank):
    aug = CrossModalAugmentedDataset(data, bank)
    with pytest.raises(CMDAError, match=r"rank: expected an integer in \[0, 2\)"):
        aug.sampler(num_replicas=2, rank=2)
    with pytest.raises(CMDAError, match="num_replicas: expected an integer >= 1"):
        aug.sampler(num_replicas=0)
    with pytest.raises(CMDAError, match="drop_last: expected True or False"):
        aug.sampler(drop_last=1)
    with pytest.raises(CMDAError, match="dataset: expected a CrossModalAugmentedDataset"):
        PoolOrderSampler(data)


def _loaded(aug, **loader):
    return [b for b in DataLoader(aug, **loader)]


def test_sampler_reads_each_sample_once_with_workers_and_gives_the_same_items(data, bank):
    counting = CountingDataset(data)
    aug = CrossModalAugmentedDataset(counting, bank, target="label", num_classes=NUM_CLASSES, p=1.0, pool_size=6,
                                     top_k=3, seed=4)
    aug.set_epoch(2)
    batches = _loaded(aug, batch_size=12, sampler=aug.sampler(), num_workers=2)
    order = aug.order().tolist()
    assert torch.cat([b["mix_info"]["index"] for b in batches]).tolist() == order
    assert all(bool(b["mix_info"]["mixed"].all()) for b in batches)
    for row, i in enumerate(order):  # the same values as the item read alone (bitwise)
        alone, batch = aug[i], batches[row // 12]
        assert torch.equal(batch["image"][row % 12], alone["image"])
        assert torch.equal(batch["label"][row % 12], alone["label"])
        assert torch.equal(batch["mix_info"]["partners"][row % 12], alone["mix_info"]["partners"])
    # reads in the worker processes: count them in one process (the workers' copies are not seen here)
    counting.reads.clear()
    for at in range(0, N, 12):
        aug.__getitems__(order[at:at + 12])
    assert sorted(counting.reads) == list(range(N))  # each sample once
    counting.reads.clear()
    shuffled = torch.randperm(N, generator=torch.Generator().manual_seed(0)).tolist()
    for at in range(0, N, 12):
        aug.__getitems__(shuffled[at:at + 12])
    assert len(counting.reads) > N  # another order reads partners from outside the batch


@pytest.mark.parametrize("keep_real", [False, True])
def test_sampler_computes_its_sequence_in_chunks_without_changing_it(data, bank, keep_real, monkeypatch):
    import cmda_data.augment.dataset as module

    aug = CrossModalAugmentedDataset(data, bank, pool_size=5, keep_real=keep_real)  # 24 = 4 blocks of 5 + 4
    whole = [list(aug.sampler(num_replicas=5, rank=r)) for r in range(5)]
    monkeypatch.setattr(module, "_SAMPLER_CHUNK", 3)
    assert [list(aug.sampler(num_replicas=5, rank=r)) for r in range(5)] == whole
    flat = [i for share in whole for i in share]
    order = aug.order().tolist()
    if keep_real:  # blocks of the order (the last one short), each followed by its generated twin
        expected = [i for at in range(0, N, 5) for i in order[at:at + 5] + [j + N for j in order[at:at + 5]]]
    else:
        expected = order
    assert flat == (expected * 2)[:len(flat)]


@pytest.mark.parametrize("options", [dict(pool_size=5, exclude_self=True), dict(pool_size=4, keep_real=True),
                                     dict(pool_size=6, top_k=None)])
def test_batches_of_block_size_read_each_sample_once(data, bank, options):
    counting = CountingDataset(data)
    aug = CrossModalAugmentedDataset(counting, bank, p=1.0, seed=1, **options)
    block = aug.block_size
    assert block == (6 if options.get("exclude_self") else 8 if options.get("keep_real") else 6)
    order = list(aug.sampler())
    usable = len(order) // block * block
    for at in range(0, usable, block):
        counting.reads.clear()
        batch = aug.__getitems__(order[at:at + block])
        real = {i % N for i in order[at:at + block]}
        assert sorted(counting.reads) == sorted(real)  # no partner from outside the batch
        for row, i in enumerate(order[at:at + block]):
            assert set(batch[row]["mix_info"]["partners"].tolist()) <= real


def test_the_epoch_is_read_once_per_pass(data, bank, monkeypatch):
    import cmda_data.augment.dataset as module

    monkeypatch.setattr(module, "_SAMPLER_CHUNK", 5)
    aug = CrossModalAugmentedDataset(data, bank, pool_size=6)
    first = aug.order().tolist()
    passes = iter(aug.sampler())
    seen = [next(passes) for _ in range(7)]
    aug.set_epoch(1)  # mid-pass: this pass keeps its epoch
    assert seen + list(passes) == first
