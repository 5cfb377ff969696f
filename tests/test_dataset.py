"""IndexedDataset and CrossModalAugmentedDataset: sample-level CMDA over a real map-style dataset."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _entry_data import (
    NUM_CLASSES,
    CountingDataset,
    PairedDataset,
    TokenDataset,
    TupleDataset,
    batches_per_p,
    make_bank,
)
from conftest import needs_cuda
from torch.utils.data import DataLoader

from cmda_data.augment.dataset import CrossModalAugmentedDataset, IndexedDataset
from cmda_data.exceptions import DeviceError, FieldError, ShapeError, ValidationError

N = 24


def snapshot(dataset):
    return [copy.deepcopy(dataset[i]) for i in range(len(dataset))]


def assert_same_samples(before, after):
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key])
            else:
                assert a[key] == b[key]


def expected_mix(data, info, field="image"):
    """The mixed student recomputed from the wrapped dataset: sum_k w_k * student[partner_k]."""
    total = torch.zeros_like(data[0][field])
    for j, w in zip(info["partners"].tolist(), info["weights"].tolist()):
        total = total + w * data[j][field]
    return total


def expected_target(data, info, label_smoothing=0.0):
    total = torch.zeros(NUM_CLASSES)
    for j, w in zip(info["partners"].tolist(), info["weights"].tolist()):
        onehot = F.one_hot(torch.tensor(data[j]["label"]), NUM_CLASSES).float()
        total = total + w * (onehot * (1 - label_smoothing) + label_smoothing / NUM_CLASSES)
    return total


# -- IndexedDataset ---------------------------------------------------------------------------------
def test_indexed_dataset_rules():
    data = PairedDataset(4)
    indexed = IndexedDataset(data)
    sample = indexed[2]
    assert sample["index"] == 2 and "index" not in data[2]
    assert IndexedDataset(TupleDataset(4))[3][-1] == 3 and len(IndexedDataset(TupleDataset(4))[3]) == 4
    assert IndexedDataset([7, 8])[1] == (8, 1)
    assert len(indexed) == 4


def test_indexed_dataset_refuses_existing_key():
    with pytest.raises(FieldError, match="field 'index' of sample 0: expected a field name not used"):
        IndexedDataset([{"index": 5}])[0]


# -- mixing -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    return PairedDataset(N)


@pytest.fixture(scope="module")
def bank():
    return make_bank(N)


def test_mixed_item_is_the_weighted_sum_of_its_partners(data, bank):
    aug = CrossModalAugmentedDataset(data, bank, target="label", num_classes=NUM_CLASSES, p=1.0, pool_size=10,
                                     top_k=4, seed=5)
    mixed_count = 0
    for i in range(N):
        item = aug[i]
        info = item["mix_info"]
        assert info["partners"].shape == (4,) and info["weights"].shape == (4,)
        assert info["weights"].dtype == torch.float32 and int(info["index"]) == i
        torch.testing.assert_close(info["weights"].sum(), torch.tensor(1.0))
        assert bool((info["weights"] >= 0).all())
        torch.testing.assert_close(item["image"], expected_mix(data, info))
        assert item["label"].dtype == torch.float32 and item["label"].shape == (NUM_CLASSES,)
        torch.testing.assert_close(item["label"], expected_target(data, info))
        torch.testing.assert_close(item["label"].sum(), torch.tensor(1.0))
        assert item["caption"] == f"sample {i}" and torch.equal(item["text"], data[i]["text"])
        mixed_count += bool(info["mixed"])
    assert mixed_count >= N - 2


def test_items_that_are_not_mixed_are_the_originals(data, bank):
    aug = CrossModalAugmentedDataset(data, bank, target="label", num_classes=NUM_CLASSES, p=0.0, top_k=3)
    for i in range(N):
        item = aug[i]
        info = item["mix_info"]
        assert not bool(info["mixed"])
        assert info["partners"].tolist() == [i, i, i] and info["weights"].tolist() == [1.0, 0.0, 0.0]
        assert torch.equal(item["image"], data[i]["image"])
        assert torch.equal(item["label"], F.one_hot(torch.tensor(data[i]["label"]), NUM_CLASSES).float())


def test_p_is_the_mixing_rate(bank):
    data = PairedDataset(200)
    big_bank = make_bank(200)
    aug = CrossModalAugmentedDataset(data, big_bank, p=0.3, top_k=4, pool_size=16, intra=None)
    rate = sum(bool(aug[i]["mix_info"]["mixed"]) for i in range(200)) / 200
    assert 0.18 < rate < 0.42


def test_label_smoothing(data, bank):
    aug = CrossModalAugmentedDataset(data, bank, target="label", num_classes=NUM_CLASSES, p=1.0, top_k=3,
                                     label_smoothing=0.1)
    item = aug[4]
    torch.testing.assert_close(item["label"], expected_target(data, item["mix_info"], 0.1))


def test_append_mode(data, bank):
    aug = CrossModalAugmentedDataset(data, bank, target="label", num_classes=NUM_CLASSES, keep_real=True, top_k=3,
                                     p=0.0)
    assert len(aug) == 2 * N
    for i in range(N):
        original, generated = aug[i], aug[N + i]
        assert torch.equal(original["image"], data[i]["image"]) and not bool(original["mix_info"]["mixed"])
        assert int(generated["mix_info"]["index"]) == i
        torch.testing.assert_close(generated["image"], expected_mix(data, generated["mix_info"]))
    assert sum(bool(aug[N + i]["mix_info"]["mixed"]) for i in range(N)) >= N - 2
    assert torch.equal(aug[-1]["image"], aug[2 * N - 1]["image"])
    with pytest.raises(IndexError):
        aug[2 * N]


def test_exclude_self_and_pool_size(data, bank):
    aug = CrossModalAugmentedDataset(data, bank, p=1.0, pool_size=6, top_k=None, exclude_self=True, seed=2)
    for i in range(N):
        info = aug[i]["mix_info"]
        partners = info["partners"].tolist()
        assert len(partners) == 6 and i not in partners and len(set(partners)) == 6
    keep = CrossModalAugmentedDataset(data, bank, p=1.0, pool_size=6, top_k=None, seed=2)
    assert all(i in keep[i]["mix_info"]["partners"].tolist() for i in range(N))


def test_only_partners_with_weight_are_fetched(bank):
    inner = PairedDataset(N)
    counting = CountingDataset(inner)
    aug = CrossModalAugmentedDataset(counting, bank, p=1.0, pool_size=N, top_k=3, intra="hard", seed=1)
    for i in range(N):
        counting.reads.clear()
        info = aug[i]["mix_info"]
        needed = {i} | {j for j, w in zip(info["partners"].tolist(), info["weights"].tolist()) if w > 0}
        assert set(counting.reads) <= needed and counting.reads.count(i) == 1


def test_several_teachers_draw_each_teacher():
    data = PairedDataset(N)
    bank = make_bank(N, teachers=2)
    aug = CrossModalAugmentedDataset(data, bank, p=1.0, top_k=3)
    chosen = {int(aug[i]["mix_info"]["teacher"]) for i in range(N)}
    assert chosen == {0, 1}


def test_tuple_samples_use_positions():
    data = TupleDataset(N)
    aug = CrossModalAugmentedDataset(data, make_bank(N), fields={"image": 0}, target=2, num_classes=NUM_CLASSES,
                                     p=1.0, top_k=3)
    item = aug[3]
    assert isinstance(item, tuple) and len(item) == 4
    info = item[3]
    total = sum(w * data[j][0] for j, w in zip(info["partners"].tolist(), info["weights"].tolist()))
    torch.testing.assert_close(item[0], total)
    assert item[2].shape == (NUM_CLASSES,) and torch.equal(item[1], data[3][1])


# -- determinism and workers ---------------------------------------------------------------------------
def test_draws_depend_on_seed_epoch_and_index_only(data, bank):
    kwargs = dict(target="label", num_classes=NUM_CLASSES, p=0.5, pool_size=8, top_k=3, seed=11)
    a = CrossModalAugmentedDataset(data, bank, **kwargs)
    b = CrossModalAugmentedDataset(data, bank, **kwargs)
    forward = [a[i]["mix_info"]["partners"] for i in range(N)]
    backward = [b[i]["mix_info"]["partners"] for i in reversed(range(N))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(forward, backward))
    a.set_epoch(1)
    assert a.epoch == 1
    epoch1 = [a[i]["mix_info"]["partners"] for i in range(N)]
    assert any(not torch.equal(x, y) for x, y in zip(forward, epoch1))
    other_seed = CrossModalAugmentedDataset(data, bank, **{**kwargs, "seed": 12})
    assert any(not torch.equal(x, other_seed[i]["mix_info"]["partners"]) for i, x in enumerate(forward))


def _batches(loader):
    return [batch for batch in loader]


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        for key in x["mix_info"]:
            assert torch.equal(x["mix_info"][key], y["mix_info"][key])


def test_num_workers_do_not_change_batches(data, bank):
    aug = CrossModalAugmentedDataset(data, bank, target="label", num_classes=NUM_CLASSES, p=0.5, top_k=3)
    single = _batches(DataLoader(aug, batch_size=5, num_workers=0))
    multi = _batches(DataLoader(aug, batch_size=5, num_workers=2))
    _assert_batches_equal(single, multi)
    assert [len(b["image"]) for b in multi] == [5, 5, 5, 5, 4]


def test_set_epoch_reaches_persistent_workers(data, bank):
    aug = CrossModalAugmentedDataset(data, bank, target="label", num_classes=NUM_CLASSES, p=0.5, top_k=3, seed=3)
    loader = DataLoader(aug, batch_size=8, num_workers=2, persistent_workers=True)
    seen = []
    for epoch in range(2):
        aug.set_epoch(epoch)
        seen.append(_batches(loader))
    for epoch in range(2):  # each epoch equals the main-process draws of that epoch
        reference = CrossModalAugmentedDataset(data, bank, target="label", num_classes=NUM_CLASSES, p=0.5, top_k=3,
                                               seed=3)
        reference.set_epoch(epoch)
        _assert_batches_equal(seen[epoch], _batches(DataLoader(reference, batch_size=8)))
    assert any(not torch.equal(x["mix_info"]["partners"], y["mix_info"]["partners"])
               for x, y in zip(seen[0], seen[1]))


def test_wrapped_dataset_is_never_mutated(bank):
    data = PairedDataset(N)
    before = snapshot(data)
    aug = CrossModalAugmentedDataset(data, bank, target="label", num_classes=NUM_CLASSES, p=0.7, top_k=4,
                                     keep_real=True)
    for _ in DataLoader(aug, batch_size=7, num_workers=0):
        pass
    for i in range(len(aug)):
        aug[i]
    assert_same_samples(before, snapshot(data))


# -- errors -------------------------------------------------------------------------------------------
def test_missing_field_names_field_and_index(bank):
    data = [{"img": torch.zeros(2), "label": 0} for _ in range(N)]
    aug = CrossModalAugmentedDataset(data, bank, p=1.0)
    with pytest.raises(FieldError, match="field 'image' of sample 7: expected a key of the sample"):
        aug[7]


def test_token_id_student_raises(bank):
    aug = CrossModalAugmentedDataset(TokenDataset(N), bank, fields={"image": "tokens"}, p=1.0)
    with pytest.raises(FieldError, match="field 'tokens' of sample 2: .*token ids cannot be interpolated: mix "
                                         "embeddings instead"):
        aug[2]


def test_bad_target_and_missing_num_classes(data, bank):
    aug = CrossModalAugmentedDataset(data, bank, target="label", p=1.0)
    with pytest.raises(ValidationError, match="num_classes: expected an integer"):
        aug[0]
    aug = CrossModalAugmentedDataset(data, bank, target="caption", num_classes=3, p=1.0)
    with pytest.raises(FieldError, match="field 'caption' of sample 0: expected a class index"):
        aug[0]


class _Changed(torch.utils.data.Dataset):
    """``data`` with sample ``at``'s field ``key`` set to ``value``."""

    def __init__(self, data, at, key, value):
        self.data, self.at, self.key, self.value = data, at, key, value

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        sample = dict(self.data[i])
        if i == self.at:
            sample[self.key] = self.value
        return sample


def test_bad_partner_values_name_the_field_and_the_sample(data, bank):
    def first_error(dataset, **options):
        aug = CrossModalAugmentedDataset(dataset, bank, target="label", num_classes=NUM_CLASSES, p=1.0,
                                         pool_size=N, top_k=None, **options)
        for i in range(N):  # every item has every sample in its pool: each one meets sample 5
            if i != 5:
                aug[i]
        raise AssertionError("no error")

    with pytest.raises(FieldError, match=r"field 'image' of sample 5: expected shape \(3, 4, 4\) like sample 0 "
                                         r"\(its mixing partner\), got \(3, 5, 5\)"):
        first_error(_Changed(data, 5, "image", torch.zeros(3, 5, 5)))
    with pytest.raises(FieldError, match=rf"field 'label' of sample 5: expected a class index in \[0, {NUM_CLASSES}\) "
                                         r"\(num_classes\), got 99"):
        first_error(_Changed(data, 5, "label", 99))
    nan = data[5]["image"].clone()
    nan[1, 2, 3] = float("inf")
    with pytest.raises(ValidationError, match=r"field 'image' of sample 5: expected finite values"):
        first_error(_Changed(data, 5, "image", nan))


def test_configuration_errors(data, bank):
    with pytest.raises(ShapeError, match=r"bank: expected one row per sample of the dataset \(10 rows\)"):
        CrossModalAugmentedDataset(PairedDataset(10), bank)
    with pytest.raises(ValidationError, match="mode: expected a keyword argument of CrossModalAugmentedDataset or a field of MixOptions"):
        CrossModalAugmentedDataset(data, bank, mode="double")
    with pytest.raises(ValidationError, match=r"p: expected a probability in \[0, 1\]"):
        CrossModalAugmentedDataset(data, bank, p=2)
    with pytest.raises(ValidationError, match="pool_size: expected an integer >= 1"):
        CrossModalAugmentedDataset(data, bank, pool_size=0)
    with pytest.raises(ValidationError, match="intra: expected one of 'soft', 'hard', None"):
        CrossModalAugmentedDataset(data, bank, intra="both")
    with pytest.raises(ValidationError, match="teachers: expected modalities of the bank"):
        CrossModalAugmentedDataset(data, bank, teachers=["audio"])
    no_gmm = make_bank(N, fit_gmm=False)
    with pytest.raises(ValidationError, match="intra: expected None for a bank without a GMM"):
        CrossModalAugmentedDataset(data, no_gmm)
    assert CrossModalAugmentedDataset(data, no_gmm, intra=None, p=1.0)[0]["image"].shape == (3, 4, 4)


def test_set_p_reaches_persistent_workers(data, bank):
    aug = CrossModalAugmentedDataset(data, bank, target="label", num_classes=NUM_CLASSES, p=0.5, top_k=3, seed=3)
    loader = DataLoader(aug, batch_size=8, num_workers=2, persistent_workers=True)
    seen = batches_per_p(aug, loader, [0.0, 1.0, 0.5])
    assert not any(bool(b["mix_info"]["mixed"].any()) for b in seen[0.0])
    for batch in seen[0.0]:
        assert torch.equal(batch["image"], torch.stack([data[int(i)]["image"] for i in batch["mix_info"]["index"]]))
    assert all(bool(b["mix_info"]["mixed"].all()) for b in seen[1.0])  # pools of 24 always hold partners
    reference = CrossModalAugmentedDataset(data, bank, target="label", num_classes=NUM_CLASSES, p=0.5, top_k=3, seed=3)
    reference.set_epoch(2)
    _assert_batches_equal(seen[0.5], _batches(DataLoader(reference, batch_size=8)))
    assert "p=0.5" in repr(aug)
    with pytest.raises(ValidationError, match="p: expected"):
        aug.set_p(2)


@needs_cuda
@pytest.mark.needs_cuda
def test_cuda_bank_inside_a_worker_points_to_cmdaugment(data):
    aug = CrossModalAugmentedDataset(data, make_bank(N).to("cuda"), p=1.0)
    loader = DataLoader(aug, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    with pytest.raises(DeviceError, match="CMDAugment"):
        next(iter(loader))


# -- batches: __getitems__ (a DataLoader's fetch) ------------------------------------------------------
def _same(a, b):
    """Exactly the same sample: same keys, same tensors (dtype, shape, bits), same other values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


BATCH_CASES = {
    "defaults": dict(),
    "top8-soft": dict(top_k=8, intra="soft"),
    "dense-soft": dict(top_k=None, intra="soft"),
    "top8-hard": dict(top_k=8, intra="hard"),
    "dense-hard": dict(top_k=None, intra="hard"),
    "inter-only": dict(top_k=8, intra=None),
    "exclude-self": dict(top_k=None, exclude_self=True, pool_size=6),
    "exclude-self-top3": dict(top_k=3, exclude_self=True),
    "keep-real": dict(keep_real=True, p=1.0, top_k=3),
    "two-teachers": dict(teachers=2, top_k=4),
    "whole-pool-no-renorm": dict(pool_size=N, renormalize=False, self_weight=2.0, label_smoothing=0.1),
    "temperature-cosine": dict(similarity="cosine", temperature=0.3, top_k=4),
}


def _batch_case(name, dataset=None, **extra):
    options = dict(BATCH_CASES[name])
    teachers = options.pop("teachers", 1)
    options.setdefault("p", 0.6)
    options.setdefault("pool_size", 10)
    dataset = PairedDataset(N) if dataset is None else dataset
    aug = CrossModalAugmentedDataset(dataset, make_bank(N, teachers=teachers), seed=4, **{**options, **extra})
    aug.set_epoch(1)
    return aug


@pytest.mark.parametrize("name", sorted(BATCH_CASES))
def test_a_batch_equals_its_items_one_at_a_time(name):
    aug = _batch_case(name, target="label", num_classes=NUM_CLASSES)
    order = torch.randperm(len(aug), generator=torch.Generator().manual_seed(3)).tolist() + [0, 0, len(aug) - 1]
    batch = aug.__getitems__(order)  # with repeated items
    single = [aug[i] for i in order]
    assert _same(batch, single)
    mixed = [bool(item["mix_info"]["mixed"]) for item in single]
    assert any(mixed) and (not all(mixed) or BATCH_CASES[name].get("keep_real"))


@pytest.mark.parametrize("name", ["defaults", "dense-hard", "exclude-self", "keep-real", "two-teachers"])
def test_dataloader_batches_with_workers_equal_the_items_one_at_a_time(name):
    aug = _batch_case(name, target="label", num_classes=NUM_CLASSES)
    order = torch.randperm(len(aug), generator=torch.Generator().manual_seed(5)).tolist()
    loader = DataLoader(aug, batch_size=7, sampler=order, num_workers=2)  # fetches with __getitems__
    batches = list(loader)
    assert len(batches) == -(-len(order) // 7)
    for at, batch in enumerate(batches):
        expected = torch.utils.data.default_collate([aug[i] for i in order[7 * at:7 * at + 7]])
        assert _same(batch, expected)


@pytest.mark.parametrize("name", ["defaults", "dense-soft", "keep-real"])
def test_tuple_batches_equal_the_items_one_at_a_time(name):
    aug = _batch_case(name, dataset=TupleDataset(N), fields={"image": 0}, target=2, num_classes=NUM_CLASSES)
    order = list(range(len(aug)))[::-1] + [3, 3]
    batch = aug.__getitems__(order)
    assert all(isinstance(item, tuple) and len(item) == 4 for item in batch)
    assert _same(batch, [aug[i] for i in order])
    loader = DataLoader(aug, batch_size=8, sampler=order, num_workers=2)
    for at, collated in enumerate(loader):
        assert _same(collated, torch.utils.data.default_collate([aug[i] for i in order[8 * at:8 * at + 8]]))


def test_a_batch_reads_each_sample_once_and_only_those_needed(bank):
    counting = CountingDataset(PairedDataset(N))
    aug = CrossModalAugmentedDataset(counting, bank, p=0.7, pool_size=N, top_k=3, intra="hard", seed=1)
    order = list(range(0, N, 2)) + [0, 2, 4]
    items = aug.__getitems__(order)
    assert len(counting.reads) == len(set(counting.reads))  # each sample once
    needed = set(order) | {j for item in items for j, w in zip(item["mix_info"]["partners"].tolist(),
                                                               item["mix_info"]["weights"].tolist()) if w > 0}
    assert set(counting.reads) == needed


def test_a_batch_raises_the_error_of_its_first_failing_item(data, bank):
    odd = _Changed(data, 5, "image", torch.zeros(3, 5, 5))
    aug = CrossModalAugmentedDataset(odd, bank, p=1.0, pool_size=N, top_k=None)
    with pytest.raises(FieldError, match=r"field 'image' of sample 5: expected shape \(3, 4, 4\) like sample 1 "):
        aug.__getitems__([1, 0, 5])
    with pytest.raises(FieldError, match=r"expected shape \(3, 5, 5\) like sample 5 "):
        aug.__getitems__([5, 1])
    with pytest.raises(IndexError):
        aug.__getitems__([0, N])


def test_pool_is_drawn_from_seed_epoch_and_index(data, bank):
    aug = CrossModalAugmentedDataset(data, bank, pool_size=6, seed=2)
    pool = aug.pool(3)
    assert pool.tolist() == sorted(set(pool.tolist())) and len(pool) == 6 and 3 in pool.tolist()
    assert torch.equal(pool, aug.pool(3)) and torch.equal(pool, aug._pools([0, 3])[1])
    aug.set_epoch(1)
    assert not all(torch.equal(aug.pool(i), CrossModalAugmentedDataset(data, bank, pool_size=6, seed=2).pool(i))
                   for i in range(N))
    assert len(CrossModalAugmentedDataset(data, bank, pool_size=6, exclude_self=True).pool(3)) == 6


@pytest.mark.parametrize("odd_dtype", [torch.float64, torch.float16])
def test_a_row_is_mixed_in_its_own_dtype_whatever_the_other_rows(data, bank, odd_dtype):
    """One sample in another float dtype: every row is mixed in its own sample's dtype, so a batch
    gives the items read alone, bit for bit and dtype for dtype."""
    odd = _Changed(data, 5, "image", data[5]["image"].to(odd_dtype))
    aug = CrossModalAugmentedDataset(odd, bank, p=1.0, pool_size=N, top_k=4, intra=None)
    batch = aug.__getitems__(list(range(N)))
    for i in range(N):
        alone = aug[i]["image"]
        assert batch[i]["image"].dtype == alone.dtype == (odd_dtype if i == 5 else torch.float32)
        assert torch.equal(batch[i]["image"], alone), i
    row = batch[5]["mix_info"]  # and the value is the convex combination of its partners, in its dtype
    work = torch.float64 if odd_dtype == torch.float64 else torch.float32
    expected = sum(w * odd[j]["image"].to(work) for j, w in zip(row["partners"].tolist(), row["weights"].tolist()))
    torch.testing.assert_close(batch[5]["image"], expected.to(odd_dtype), rtol=1e-3, atol=1e-3)
