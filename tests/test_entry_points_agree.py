"""Same seed, same pool: the four entry points give the same samples.

The dataset's pool covers the whole (small) dataset; the collate and the module see one
batch holding the whole dataset in order; the stream buffer's last sample sees all the others.
All build their plans with ``cmda_data.bank._plan.bank_plan`` -> ``cmda_data.core.build.build_plan``
from per-row draws seeded by (seed, epoch, rank, index), and all take one ``MixOptions``.
"""

from __future__ import annotations

import pytest
import torch
from _entry_data import NUM_CLASSES, PairedDataset, make_bank
from conftest import CPU_AND_CUDA
from torch.utils.data import DataLoader, default_collate

from cmda_data.augment.buffer import CandidateBuffer
from cmda_data.augment.collate import CMDACollate
from cmda_data.augment.dataset import CrossModalAugmentedDataset, IndexedDataset
from cmda_data.augment.module import CMDAugment
from cmda_data.options import MixOptions

N = 20

CONFIGS = {
    "soft-topk": dict(intra="soft", top_k=4, p=0.6),
    "hard-dense": dict(intra="hard", top_k=None, p=0.9),
    "inter-only": dict(intra=None, top_k=3, p=1.0),
    "exclude-self": dict(intra="soft", top_k=5, p=0.7, exclude_self=True),
    "temperature-cosine": dict(intra="soft", top_k=4, p=0.5, similarity="cosine", temperature=0.2),
    "smoothing": dict(intra="soft", top_k=4, p=0.8, label_smoothing=0.1),
    "self-weight-no-renorm": dict(intra="soft", top_k=4, p=0.8, self_weight=2.0, renormalize=False),
    "defaults": dict(),
}


def three_ways(config, teachers=1, seed=13, epoch=0, device="cpu", batch=False):
    data = PairedDataset(N, seed=2)
    bank = make_bank(N, teachers=teachers)
    options = MixOptions(seed=seed, pool_size=N, **config)  # one options object for every entry point
    common = dict(target="label", num_classes=NUM_CLASSES)
    dataset = CrossModalAugmentedDataset(data, bank, options, **common)
    collate = CMDACollate(bank, options, **common)
    module = CMDAugment(bank.to(device), options, **common)
    for entry in (dataset, collate, module):
        entry.set_epoch(epoch)
    items = dataset.__getitems__(list(range(N))) if batch else [dataset[i] for i in range(N)]
    from_dataset = default_collate(items)
    samples = [IndexedDataset(data)[i] for i in range(N)]
    from_collate = collate(samples)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in default_collate(samples).items()}
    from_module, _ = module(batch)
    from_module = {k: {kk: vv.cpu() for kk, vv in v.items()} if k == "mix_info" else
                   v.cpu() if isinstance(v, torch.Tensor) else v for k, v in from_module.items()}
    return from_dataset, from_collate, from_module


def assert_agree(a, b):
    for key in ("index", "partners", "mixed", "teacher"):
        assert torch.equal(a["mix_info"][key], b["mix_info"][key]), key
    torch.testing.assert_close(a["mix_info"]["weights"], b["mix_info"]["weights"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a["image"], b["image"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["label"], b["label"], atol=1e-6, rtol=1e-5)
    assert torch.equal(a["text"], b["text"]) and a["caption"] == b["caption"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dataset_collate_and_module_agree(name):
    from_dataset, from_collate, from_module = three_ways(CONFIGS[name])
    assert_agree(from_dataset, from_collate)
    assert_agree(from_collate, from_module)
    mixed = from_collate["mix_info"]["mixed"]
    assert 0 < int(mixed.sum())
    if CONFIGS[name].get("p", MixOptions().p) < 1:
        assert int(mixed.sum()) < N


@pytest.mark.parametrize("name", ["defaults", "soft-topk", "exclude-self", "self-weight-no-renorm"])
def test_the_stream_buffer_agrees_when_its_pool_holds_the_batch(name):
    """The buffer's last sample has every other sample as a candidate: it is the collate's last row."""
    data = PairedDataset(N, seed=2)
    bank = make_bank(N)
    options = MixOptions(seed=13, pool_size=N, **CONFIGS[name])
    samples = [IndexedDataset(data)[i] for i in range(N)]
    from_collate = CMDACollate(bank, options, target="label", num_classes=NUM_CLASSES)(samples)
    last = list(CandidateBuffer(bank, options, target="label", num_classes=NUM_CLASSES)(iter(samples)))[-1]
    last = default_collate([last])
    row = {key: value[-1:] for key, value in from_collate.items() if key not in ("mix_info", "caption")}
    row["mix_info"] = {key: value[-1:] for key, value in from_collate["mix_info"].items()}
    row["caption"] = from_collate["caption"][-1:]
    assert_agree(last, row)


def test_every_entry_point_declares_the_mixing_options_once():
    """No entry point declares a MixOptions field itself: all take `options` (+ keywords forwarded)."""
    import dataclasses
    import inspect

    fields = {f.name for f in dataclasses.fields(MixOptions)}
    for entry in (CrossModalAugmentedDataset, CMDACollate, CMDAugment, CandidateBuffer):
        parameters = inspect.signature(entry).parameters
        assert "options" in parameters and not fields & set(parameters), entry
        names = list(parameters)
        assert names[names.index("options") - 1] == "bank", entry  # (bank, options) in that order
        assert any(p.kind is p.VAR_KEYWORD for p in parameters.values()), entry


@pytest.mark.parametrize("epoch", [0, 3])
def test_agree_with_several_teachers_and_epochs(epoch):
    from_dataset, from_collate, from_module = three_ways(CONFIGS["soft-topk"], teachers=2, epoch=epoch)
    assert set(from_collate["mix_info"]["teacher"].tolist()) == {0, 1}
    assert_agree(from_dataset, from_collate)
    assert_agree(from_collate, from_module)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_module_on_device_agrees(device):
    from_dataset, from_collate, from_module = three_ways(CONFIGS["soft-topk"], device=device)
    assert_agree(from_collate, from_module)


def test_agree_through_dataloaders_with_workers():
    data = PairedDataset(N, seed=2)
    bank = make_bank(N).share_memory_()
    common = dict(target="label", num_classes=NUM_CLASSES, seed=5, intra="soft", top_k=4, p=0.5)
    dataset = CrossModalAugmentedDataset(data, bank, pool_size=N, **common)
    collate = CMDACollate(bank, **common)
    from_dataset = next(iter(DataLoader(dataset, batch_size=N, num_workers=2)))
    from_collate = next(iter(DataLoader(IndexedDataset(data), batch_size=N, num_workers=2, collate_fn=collate)))
    assert_agree(from_dataset, from_collate)


def test_different_seeds_disagree():
    a = three_ways(CONFIGS["soft-topk"], seed=1)[1]
    b = three_ways(CONFIGS["soft-topk"], seed=2)[1]
    assert not torch.equal(a["mix_info"]["mixed"], b["mix_info"]["mixed"]) or not torch.equal(
        a["mix_info"]["teacher"], b["mix_info"]["teacher"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_dataset_batch_agrees_with_the_collate(name):
    """The dataset's batch path (__getitems__: one plan call, one pool per item) gives the collate's rows."""
    from_dataset, from_collate, _ = three_ways(CONFIGS[name], batch=True)
    assert_agree(from_dataset, from_collate)
