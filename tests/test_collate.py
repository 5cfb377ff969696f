"""CMDACollate: per-batch CMDA in collate_fn, with real DataLoader workers and webdataset batching."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _entry_data import NUM_CLASSES, PairedDataset, TokenDataset, TupleDataset, batches_per_p, make_bank
from conftest import needs_cuda
from torch.utils.data import DataLoader, default_collate

from cmda_data.augment.collate import CMDACollate
from cmda_data.augment.dataset import IndexedDataset
from cmda_data.exceptions import DeviceError, FieldError, ValidationError

N = 21


@pytest.fixture(scope="module")
def data():
    return PairedDataset(N)


@pytest.fixture(scope="module")
def bank():
    return make_bank(N).share_memory_()


def collate_for(bank, **kwargs):
    kwargs.setdefault("target", "label")
    kwargs.setdefault("num_classes", NUM_CLASSES)
    return CMDACollate(bank, **kwargs)


def check_batch(batch, data):
    """Every row equals sum_k w_k * student[partner_k] recomputed from the dataset; targets too."""
    info = batch["mix_info"]
    b, k = info["partners"].shape
    assert batch["image"].shape == (b, 3, 4, 4) and batch["label"].shape == (b, NUM_CLASSES)
    assert torch.equal(info["index"], batch["index"])
    torch.testing.assert_close(info["weights"].sum(1), torch.ones(b))
    torch.testing.assert_close(batch["label"].sum(1), torch.ones(b))
    for r in range(b):
        partners, weights = info["partners"][r].tolist(), info["weights"][r].tolist()
        image = sum(w * data[j]["image"] for j, w in zip(partners, weights))
        label = sum(w * F.one_hot(torch.tensor(data[j]["label"]), NUM_CLASSES).float()
                    for j, w in zip(partners, weights))
        torch.testing.assert_close(batch["image"][r], image)
        torch.testing.assert_close(batch["label"][r], label)
        if not bool(info["mixed"][r]):
            i = int(batch["index"][r])
            assert partners[0] == i and weights[0] == 1.0
            assert torch.equal(batch["image"][r], data[i]["image"])


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for key in ("image", "label", "index"):
            assert torch.equal(x[key], y[key])
        for key in x["mix_info"]:
            assert torch.equal(x["mix_info"][key], y["mix_info"][key])


def test_batch_structure_and_values(data, bank):
    collate = collate_for(bank, p=0.6, seed=4)
    indexed = IndexedDataset(data)
    batch = collate([indexed[i] for i in [3, 8, 1, 17, 12, 5, 0]])
    assert set(batch) == {"image", "text", "label", "caption", "index", "mix_info"}
    assert batch["caption"][0] == "sample 3" and batch["index"].tolist() == [3, 8, 1, 17, 12, 5, 0]
    assert batch["mix_info"]["partners"].shape == (7, 7)  # top_k=None: the whole batch
    assert batch["mix_info"]["mixed"].dtype == torch.bool and batch["mix_info"]["teacher"].dtype == torch.int64
    check_batch(batch, data)
    assert 0 < int(batch["mix_info"]["mixed"].sum()) < 7


def test_default_p_is_half_and_p_zero_is_default_collate(data, bank):
    assert CMDACollate(bank).options.p == 0.5
    indexed = IndexedDataset(data)
    samples = [indexed[i] for i in range(9)]
    batch = collate_for(bank, p=0.0)(samples)
    plain = default_collate(samples)
    assert torch.equal(batch["image"], plain["image"]) and not batch["mix_info"]["mixed"].any()
    assert torch.equal(batch["label"], F.one_hot(plain["label"], NUM_CLASSES).float())


def test_top_k_hard_intra_and_several_teachers(data):
    bank = make_bank(N, teachers=2)
    collate = CMDACollate(bank, target="label", num_classes=NUM_CLASSES, top_k=3, intra="hard", p=1.0)
    batch = collate([IndexedDataset(data)[i] for i in range(N)])
    assert batch["mix_info"]["partners"].shape == (N, 3)
    assert set(batch["mix_info"]["teacher"].tolist()) == {0, 1}
    check_batch(batch, data)


def test_exclude_self(data, bank):
    collate = collate_for(bank, p=1.0, exclude_self=True, top_k=4)
    batch = collate([IndexedDataset(data)[i] for i in range(10)])
    info = batch["mix_info"]
    for r in range(10):
        used = {j for j, w in zip(info["partners"][r].tolist(), info["weights"][r].tolist()) if w > 0}
        assert r not in used
    check_batch(batch, data)


@pytest.mark.parametrize("size", [1, 2, 7])
def test_small_and_odd_batches(data, bank, size):
    collate = collate_for(bank, p=1.0, top_k=4, exclude_self=True)
    batch = collate([IndexedDataset(data)[i] for i in range(size)])
    assert batch["image"].shape[0] == size and batch["mix_info"]["partners"].shape == (size, min(4, size))
    check_batch(batch, data)
    if size == 1:  # no other partner: the sample keeps itself
        assert not bool(batch["mix_info"]["mixed"][0])
        assert torch.equal(batch["image"][0], data[0]["image"])


def test_final_partial_batch_through_a_dataloader(data, bank):
    loader = DataLoader(IndexedDataset(data), batch_size=8, collate_fn=collate_for(bank, p=0.5))
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [8, 8, 5]
    for batch in batches:
        check_batch(batch, data)


def test_pickle_round_trip(data, bank):
    collate = collate_for(bank, p=0.5, top_k=5, seed=9)
    collate.set_epoch(3)
    again = pickle.loads(pickle.dumps(collate))
    assert again.epoch == 3 and again.options == collate.options
    samples = [IndexedDataset(data)[i] for i in range(N)]
    assert_batches_equal([collate(samples)], [again(samples)])


def test_num_workers_do_not_change_batches(data, bank):
    collate = collate_for(bank, p=0.5, top_k=4)
    single = list(DataLoader(IndexedDataset(data), batch_size=6, collate_fn=collate, num_workers=0))
    multi = list(DataLoader(IndexedDataset(data), batch_size=6, collate_fn=collate, num_workers=2))
    assert_batches_equal(single, multi)


def test_set_epoch_reaches_persistent_workers(data, bank):
    collate = collate_for(bank, p=0.5, top_k=4, seed=2)
    loader = DataLoader(IndexedDataset(data), batch_size=7, collate_fn=collate, num_workers=2,
                        persistent_workers=True)
    seen = []
    for epoch in range(2):
        collate.set_epoch(epoch)
        seen.append(list(loader))
    for epoch in range(2):
        reference = collate_for(bank, p=0.5, top_k=4, seed=2)
        reference.set_epoch(epoch)
        # fresh (non-persistent) workers: the same one-thread arithmetic as the persistent ones,
        # so the mixed values agree bit for bit (the main process's threads may round differently)
        fresh = DataLoader(IndexedDataset(data), batch_size=7, collate_fn=reference, num_workers=2)
        assert_batches_equal(seen[epoch], list(fresh))
    assert any(not torch.equal(x["mix_info"]["mixed"], y["mix_info"]["mixed"]) for x, y in zip(*seen))


def test_webdataset_collation_fn(data, bank):
    wds = pytest.importorskip("webdataset")
    collate = collate_for(bank, p=0.5)
    stage = wds.batched(4, collation_fn=collate, partial=True)
    batches = list(stage(iter([IndexedDataset(data)[i] for i in range(N)])))
    assert [len(b["index"]) for b in batches] == [4, 4, 4, 4, 4, 1]
    for batch in batches:
        check_batch(batch, data)


def test_tuple_samples(bank):
    data = TupleDataset(N)
    collate = CMDACollate(bank, fields={"image": 0}, target=2, num_classes=NUM_CLASSES, p=1.0, top_k=3)
    batch = collate([IndexedDataset(data)[i] for i in range(6)])
    assert isinstance(batch, tuple) and len(batch) == 5
    image, text, label, index, info = batch
    assert index.tolist() == list(range(6)) and label.shape == (6, NUM_CLASSES)
    for r in range(6):
        expected = sum(w * data[j][0] for j, w in zip(info["partners"][r].tolist(), info["weights"][r].tolist()))
        torch.testing.assert_close(image[r], expected)
    assert torch.equal(text, torch.stack([data[i][1] for i in range(6)]))


# -- errors ----------------------------------------------------------------------------------------
def test_missing_index_points_to_indexed_dataset(data, bank):
    """The hint names both ways to lose the index: no IndexedDataset, and Hugging Face Trainer's column removal."""
    with pytest.raises(FieldError, match="field 'index' of sample 0 of the batch: expected the sample's dataset "
                                         r"index \(keys: .*\): wrap the dataset in IndexedDataset") as error:
        collate_for(bank)([data[0], data[1]])
    assert "remove_unused_columns=False" in str(error.value)


def test_missing_student_field_names_dataset_index(bank):
    samples = [{"img": torch.zeros(2), "label": 0, "index": i} for i in (4, 9)]
    with pytest.raises(FieldError, match="field 'image' of sample 4"):
        collate_for(bank)(samples)


def test_bad_values_name_the_field_and_the_sample(data, bank):
    """Shapes, index types, class indices and NaN: the error names the field and the dataset index."""
    def batch(**change):
        samples = [dict(IndexedDataset(data)[i]) for i in (3, 8, 11)]
        for key, value in change.items():
            samples[1][key] = value  # sample 8
        return samples

    with pytest.raises(FieldError, match=r"field 'image' of sample 8: expected shape \(3, 4, 4\) like sample 3 "
                                         r"\(samples of a batch are stacked\), got \(3, 5, 5\)"):
        collate_for(bank)(batch(image=torch.zeros(3, 5, 5)))
    with pytest.raises(FieldError, match=r"field 'index' of sample 1 of the batch: expected an int dataset index"):
        collate_for(bank)(batch(index="x"))
    with pytest.raises(FieldError, match=rf"field 'label' of sample 8: expected a class index in \[0, {NUM_CLASSES}\) "
                                         rf"\(num_classes\), got {NUM_CLASSES + 2}"):
        collate_for(bank)(batch(label=NUM_CLASSES + 2))
    with pytest.raises(FieldError, match=r"field 'label' of sample 8: expected a class index in .*got -1"):
        collate_for(bank)(batch(label=-1))
    numpy_index = [dict(s, index=np.int64(s["index"])) for s in batch(label=-1)]  # numpy ints are indices too
    with pytest.raises(FieldError, match=r"field 'label' of sample 8: expected a class index in .*got -1"):
        collate_for(bank)(numpy_index)
    nan = data[8]["image"].clone()
    nan[0, 1, 1] = float("nan")
    with pytest.raises(ValidationError, match=r"field 'image' of sample 8: expected finite values \(no NaN or inf\), "
                                              r"got 1 non-finite entries \(rows with any: 1 of 3\)"):
        collate_for(bank, p=1.0)(batch(image=nan))


def test_token_ids_raise(bank):
    samples = [IndexedDataset(TokenDataset(N))[i] for i in (2, 3)]
    with pytest.raises(FieldError, match="field 'tokens' of sample 2: .*mix embeddings instead"):
        CMDACollate(bank, fields={"image": "tokens"})(samples)


def test_bad_target_and_options(data, bank):
    samples = [IndexedDataset(data)[i] for i in (0, 1)]
    with pytest.raises(FieldError, match="field 'caption' of sample 0: expected a class index"):
        CMDACollate(bank, target="caption")(samples)
    with pytest.raises(ValidationError, match="num_classes: expected an integer"):
        CMDACollate(bank, target="label")(samples)
    with pytest.raises(ValidationError, match=r"p: expected a probability in \[0, 1\], got 1.5"):
        CMDACollate(bank, p=1.5)
    with pytest.raises(ValidationError, match="top_k: expected an integer >= 1"):
        CMDACollate(bank, top_k=0)
    with pytest.raises(ValidationError, match="bank: expected an EmbeddingBank"):
        CMDACollate({"image": torch.zeros(3, 2)})
    with pytest.raises(ValidationError, match="samples: expected a non-empty list"):
        CMDACollate(bank)([])


@needs_cuda
@pytest.mark.needs_cuda
def test_cuda_bank_inside_a_worker_points_to_cmdaugment(data):
    collate = collate_for(make_bank(N).to("cuda"), p=1.0)
    loader = DataLoader(IndexedDataset(data), batch_size=4, collate_fn=collate, num_workers=1,
                        multiprocessing_context="spawn")
    with pytest.raises(DeviceError, match="CMDAugment"):
        next(iter(loader))


def test_worker_batches_cross_as_one_shared_segment(data, bank):
    """Inside a worker the batch's tensors are packed into one shared storage (one fd per batch)."""
    loader = DataLoader(IndexedDataset(data), batch_size=6, collate_fn=collate_for(bank, p=0.5), num_workers=1)
    batch = next(iter(loader))
    tensors = [batch["image"], batch["text"], batch["label"], batch["index"], *batch["mix_info"].values()]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    assert batch["mix_info"]["index"] is batch["index"] or torch.equal(batch["mix_info"]["index"], batch["index"])
    check_batch(batch, data)


def test_tuple_samples_through_workers(bank):
    data = TupleDataset(N)
    collate = CMDACollate(bank, fields={"image": 0}, target=2, num_classes=NUM_CLASSES, p=0.5, top_k=3)
    single = list(DataLoader(IndexedDataset(data), batch_size=5, collate_fn=collate))
    multi = list(DataLoader(IndexedDataset(data), batch_size=5, collate_fn=collate, num_workers=2))
    for x, y in zip(single, multi):
        assert isinstance(y, tuple) and len(y) == 5
        for a, b in zip(x[:4], y[:4]):
            assert torch.equal(a, b)
        for key in x[4]:
            assert torch.equal(x[4][key], y[4][key])


# -- set_p: a mixing probability that changes during training -------------------------------
def test_set_p_reaches_persistent_workers(data, bank):
    collate = collate_for(bank, p=0.5, seed=2)
    loader = DataLoader(IndexedDataset(data), batch_size=7, collate_fn=collate, num_workers=2,
                        persistent_workers=True)
    seen = batches_per_p(collate, loader, [0.0, 1.0, 0.5])
    assert not any(bool(b["mix_info"]["mixed"].any()) for b in seen[0.0])
    for batch in seen[0.0]:  # nothing mixed: the originals, one-hot targets
        assert torch.equal(batch["image"], default_collate([data[i] for i in batch["index"].tolist()])["image"])
    assert all(bool(b["mix_info"]["mixed"].all()) for b in seen[1.0])  # every row of 7 has partners
    reference = collate_for(bank, p=0.5, seed=2)  # p given to the constructor == p set later
    reference.set_epoch(2)
    assert_batches_equal(seen[0.5], list(DataLoader(IndexedDataset(data), batch_size=7, collate_fn=reference)))


def test_set_p_draws_are_monotone_in_p_and_validated(data, bank):
    samples = [IndexedDataset(data)[i] for i in range(N)]
    collate = collate_for(bank, p=0.3, seed=5)
    low = collate(samples)["mix_info"]["mixed"]
    collate.set_p(0.8)
    high = collate(samples)["mix_info"]["mixed"]
    assert bool((high | ~low).all()) and int(high.sum()) > int(low.sum())  # mixed at 0.3 -> mixed at 0.8
    assert "p=0.8" in repr(collate) and pickle.loads(pickle.dumps(collate)).p == 0.8
    for bad in (1.5, -0.1, "half", float("nan")):
        with pytest.raises(ValidationError, match="p: expected"):
            collate.set_p(bad)
    assert collate.p == 0.8


# -- keep_real: the real batch followed by the generated rows -------------------------------
def test_keep_real_appends_the_mixed_rows(data, bank):
    order = [3, 8, 1, 17, 12, 5, 0, 20, 9]
    samples = [IndexedDataset(data)[i] for i in order]
    kwargs = dict(p=0.5, top_k=4, seed=11, label_smoothing=0.1)
    replaced = collate_for(bank, **kwargs)(samples)
    out = collate_for(bank, keep_real=True, **kwargs)(samples)
    rows = replaced["mix_info"]["mixed"].nonzero().reshape(-1)
    b, g = len(order), len(rows)
    assert 0 < g < b
    real = default_collate(samples)
    assert set(out) == set(replaced)
    assert out["image"].shape == (b + g, 3, 4, 4) and out["label"].shape == (b + g, NUM_CLASSES)
    for key in ("image", "text", "index"):  # first B rows: default_collate's; then the mixed rows
        assert torch.equal(out[key][:b], real[key])
        assert torch.equal(out[key][b:], replaced[key][rows])
    assert out["caption"] == real["caption"] + [replaced["caption"][r] for r in rows.tolist()]
    hard = F.one_hot(real["label"], NUM_CLASSES).float() * 0.9 + 0.1 / NUM_CLASSES  # smoothed one-hot
    torch.testing.assert_close(out["label"][:b], hard)
    assert torch.equal(out["label"][b:], replaced["label"][rows])
    info, before = out["mix_info"], replaced["mix_info"]
    assert info["mixed"].tolist() == [False] * b + [True] * g
    assert info["source"].tolist() == list(range(b)) + rows.tolist()
    assert torch.equal(info["index"], out["index"])
    for key in ("partners", "weights", "teacher"):
        assert torch.equal(info[key][b:], before[key][rows])
    assert torch.equal(info["partners"][:b], real["index"][:, None].expand(b, 4))
    assert info["weights"][:b].tolist() == [[1.0, 0.0, 0.0, 0.0]] * b
    kwargs["label_smoothing"] = 0.0  # every row is the weighted sum of its partners, real rows the identity
    check_batch(collate_for(bank, keep_real=True, **kwargs)(samples), data)


def test_keep_real_with_p_one_and_p_zero(data, bank):
    samples = [IndexedDataset(data)[i] for i in range(8)]
    collate = collate_for(bank, p=1.0, keep_real=True)
    out = collate(samples)
    assert out["image"].shape[0] == 16 and out["mix_info"]["mixed"].sum() == 8  # the paper: B real + B generated
    collate.set_p(0.0)
    out = collate(samples)
    assert out["image"].shape[0] == 8 and torch.equal(out["image"], default_collate(samples)["image"])
    with pytest.raises(ValidationError, match="keep_real: expected True or False"):
        collate_for(bank, keep_real=1)


def test_keep_real_tuple_samples_and_workers(bank):
    data = TupleDataset(N)
    kwargs = dict(fields={"image": 0}, target=2, num_classes=NUM_CLASSES, p=0.7, top_k=3, seed=1)
    replaced = CMDACollate(bank, **kwargs)
    keep = CMDACollate(bank, keep_real=True, **kwargs)
    indexed = IndexedDataset(data)
    batches = list(DataLoader(indexed, batch_size=6, collate_fn=keep, num_workers=2))
    for start, out in zip(range(0, N, 6), batches):
        samples = [indexed[i] for i in range(start, min(start + 6, N))]
        ref, real = replaced(samples), default_collate(samples)
        rows = ref[-1]["mixed"].nonzero().reshape(-1)
        b = len(samples)
        assert len(out) == 5 and out[0].shape[0] == b + len(rows)
        assert torch.equal(out[0][:b], real[0]) and torch.equal(out[0][b:], ref[0][rows])
        assert torch.equal(out[3], torch.cat([real[3], real[3][rows]]))  # index, then the source rows' index
        assert torch.equal(out[2][b:], ref[2][rows]) and torch.equal(out[-1]["mixed"][b:], ref[-1]["mixed"][rows])
