"""cmda_data.distributed: single-process fallbacks, and two REAL gloo processes on this machine."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from cmda_data.augment.collate import CMDACollate
from cmda_data.augment.dataset import CrossModalAugmentedDataset, IndexedDataset
from cmda_data.augment.module import CMDAugment
from cmda_data.bank import EmbeddingBank
from cmda_data.distributed import (
    all_gather_rows,
    broadcast_bank,
    build_bank_distributed,
    get_rank,
    get_world_size,
    is_distributed,
    rank_generator,
    rank_seed,
    set_epoch,
    shard_indices,
)
from cmda_data.exceptions import ValidationError

N = 11  # odd: the two shards differ in size (6 and 5 rows), so the gather needs padding
NUM_CLASSES = 3
BANK_OPTIONS = dict(n_components=2, covariance_type="diag", random_state=0)


def make_data(n: int = N):
    g = torch.Generator().manual_seed(11)
    centers = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 0.0]])
    data = []
    for i in range(n):
        c = centers[i % 2]
        data.append({"image": c + 0.3 * torch.randn(5, generator=g), "text": c + 0.3 * torch.randn(5, generator=g),
                     "label": i % NUM_CLASSES})
    return data


class ElementwiseAligner:
    """Row-wise (batch-independent) embeddings, so a sharded build equals a single-process one bit for bit."""

    modalities = ("image", "text")

    def embed(self, modality, batch):
        scale = 1.0 if modality == "image" else 0.8
        return torch.nn.functional.normalize(torch.tanh(batch.float() * scale), dim=1)


def _collate(bank, rank):
    return CMDACollate(bank, target="label", num_classes=NUM_CLASSES, p=0.5, intra="soft", seed=7, rank=rank)


def _augmented(bank, data, rank):
    return CrossModalAugmentedDataset(data, bank, target="label", num_classes=NUM_CLASSES, p=0.5, pool_size=4,
                                      top_k=2, intra="soft", seed=7, rank=rank)


def _draws(bank, data, rank):
    """What a rank draws for the same indices: a CMDACollate batch and the augmented dataset's items."""
    indexed = IndexedDataset(data)
    batch = _collate(bank, rank)([indexed[i] for i in range(len(data))])
    aug = _augmented(bank, data, rank)
    items = [aug[i] for i in range(len(data))]
    return {"collate.image": batch["image"], "collate.label": batch["label"],
            "collate.mixed": batch["mix_info"]["mixed"], "aug.image": torch.stack([x["image"] for x in items]),
            "aug.mixed": torch.stack([x["mix_info"]["mixed"] for x in items])}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One gloo rank: results go to files (tensors only, loadable with weights_only=True)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        folder = Path(out)
        data = make_data()
        bank = build_bank_distributed(data, ElementwiseAligner(), student="image", teachers="text", batch_size=2,
                                      **BANK_OPTIONS)
        results = {"rank_world": torch.tensor([get_rank(), get_world_size(), int(is_distributed())]),
                   "emb.image": bank.embeddings["image"], "emb.text": bank.embeddings["text"],
                   "resp": bank.responsibilities, "gmm.means": bank.gmm.means_,
                   "gen": torch.rand(4, generator=rank_generator(7, epoch=1))}
        results.update(_draws(bank, data, None))  # rank=None: the process group rank
        # the default rank is the process group's too (made after init_process_group)
        batch = [IndexedDataset(data)[i] for i in range(len(data))]
        default = CMDACollate(bank, target="label", num_classes=NUM_CLASSES, p=0.5, intra="soft", seed=7)(batch)
        results["default.collate.mixed"] = default["mix_info"]["mixed"]
        module = CMDAugment(bank=bank, target="label", num_classes=NUM_CLASSES, p=0.5, intra="soft", seed=7)
        results["default.augment.mixed"] = module(default_collate(batch))[1].mixed
        aug = _augmented(bank, data, None)  # its sampler: the group's world size and rank, one shared order
        aug.set_epoch(3)
        results["sampler.share"] = torch.tensor(list(aug.sampler()))
        results["sampler.order"] = aug.order()
        for r, part in enumerate(all_gather_rows(torch.full((rank + 1, 2), float(rank)))):
            results[f"gather.{r}"] = part
        copy = broadcast_bank(bank if rank == 0 else None)
        results["broadcast.resp"] = copy.responsibilities
        torch.save({k: v.detach().clone() for k, v in results.items()}, folder / f"rank{rank}.pt")
        # failures are raised on every rank, never a hang: one on rank 0's GMM fit ...
        messages = []
        try:
            build_bank_distributed(data, ElementwiseAligner(), student="image", teachers="text", n_components=99)
        except Exception as error:  # noqa: BLE001 - the message is the result
            messages.append(f"{type(error).__name__}|{error}")
        # ... and one while rank 1 embeds its shard (sample 3 lacks its text)
        broken = [dict(s) for s in data]
        del broken[3]["text"]
        try:
            build_bank_distributed(broken, ElementwiseAligner(), student="image", teachers="text")
        except Exception as error:  # noqa: BLE001
            messages.append(f"{type(error).__name__}|{error}")
        (folder / f"rank{rank}.txt").write_text("\n".join(messages), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(world: int, out: Path, timeout: float = 120.0) -> None:
    context = mp.start_processes(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):  # raises ProcessRaisedException with the child's traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {world} gloo ranks did not finish within {timeout} s")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo")
    _run_ranks(2, out)
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    messages = [(out / f"rank{r}.txt").read_text(encoding="utf-8").splitlines() for r in range(2)]
    return results, messages


@pytest.fixture(scope="module")
def reference():
    return EmbeddingBank.build(make_data(), ElementwiseAligner(), student="image", teachers="text", batch_size=4,
                               progress=False, **BANK_OPTIONS)


# --------------------------------------------------------------------------- two gloo ranks
def test_ranks_see_their_rank_and_world(ranks):
    results, _ = ranks
    assert [r["rank_world"].tolist() for r in results] == [[0, 2, 1], [1, 2, 1]]


def test_both_ranks_hold_the_single_process_bank(ranks, reference):
    results, _ = ranks
    for r in results:
        assert torch.equal(r["emb.image"], reference.embeddings["image"])
        assert torch.equal(r["emb.text"], reference.embeddings["text"])
        torch.testing.assert_close(r["resp"], reference.responsibilities, rtol=0, atol=1e-6)
        torch.testing.assert_close(r["gmm.means"], reference.gmm.means_, rtol=0, atol=1e-6)
    for key in ("emb.image", "emb.text", "resp", "gmm.means", "broadcast.resp"):
        assert torch.equal(results[0][key], results[1][key]), key  # identical on both ranks, bit for bit


def test_draws_differ_between_ranks_and_reproduce_per_rank(ranks, reference):
    results, _ = ranks
    for key in ("collate.mixed", "aug.mixed", "default.augment.mixed"):
        assert not torch.equal(results[0][key], results[1][key]), key  # the rank is part of the seed
    for r in results:  # no rank argument: the process group's rank, as rank=None
        assert torch.equal(r["default.collate.mixed"], r["collate.mixed"])
    assert not torch.equal(results[0]["gen"], results[1]["gen"])
    data = make_data()
    for rank, r in enumerate(results):  # the same draws again, in this process, from (seed, epoch, rank)
        again = _draws(reference, data, rank)
        for key, value in again.items():
            torch.testing.assert_close(r[key], value, rtol=0, atol=1e-6)
        assert torch.equal(r["gen"], torch.rand(4, generator=rank_generator(7, epoch=1, rank=rank)))


def test_dataset_sampler_gives_each_rank_its_share_of_one_order(ranks, reference):
    results, _ = ranks
    order = results[0]["sampler.order"]
    assert torch.equal(order, results[1]["sampler.order"])  # (seed, epoch) only: one order for every rank
    expected = _augmented(reference, make_data(), 0)
    expected.set_epoch(3)
    assert torch.equal(order, expected.order())
    shares = [r["sampler.share"].tolist() for r in results]
    assert shares == [order[:6].tolist(), order[6:].tolist() + order[:1].tolist()]  # 11 items: 6 + 6, topped up


def test_all_gather_rows_with_uneven_counts(ranks):
    results, _ = ranks
    for r in results:
        assert torch.equal(r["gather.0"], torch.zeros(1, 2)) and torch.equal(r["gather.1"], torch.ones(2, 2))


def test_failures_reach_every_rank(ranks):
    _, messages = ranks
    fit_0, fit_1 = messages[0][0], messages[1][0]
    assert fit_0.startswith("ValidationError|n_components: expected at most the number of rows (11)")
    assert fit_1.startswith("CMDAError|build_bank_distributed: expected a bank from rank 0, got a failure there: "
                            "ValidationError: n_components")
    embed_0, embed_1 = messages[0][1], messages[1][1]
    assert embed_0 == ("CMDAError|build_bank_distributed: expected every rank to embed its shard, got a failure "
                       "on rank(s) [1] (see the error raised there)")
    assert embed_1.startswith("FieldError|field 'text' of sample 3")


# --------------------------------------------------------------------------- one process, no process group
def test_without_process_group():
    assert (get_rank(), get_world_size(), is_distributed()) == (0, 1, False)
    t = torch.arange(6.0).reshape(3, 2)
    assert len(all_gather_rows(t)) == 1 and torch.equal(all_gather_rows(t)[0], t)
    data = make_data()
    bank = build_bank_distributed(data, ElementwiseAligner(), student="image", teachers="text", **BANK_OPTIONS)
    ref = EmbeddingBank.build(data, ElementwiseAligner(), student="image", teachers="text", progress=False,
                              **BANK_OPTIONS)
    assert torch.equal(bank.embeddings["image"], ref.embeddings["image"])
    assert torch.equal(bank.responsibilities, ref.responsibilities)
    assert broadcast_bank(bank) is bank
    with pytest.raises(ValidationError, match="bank: expected an EmbeddingBank"):
        broadcast_bank(None)


@pytest.mark.parametrize("n", [0, 1, 5, 11, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_indices_partition_without_padding(n, world):
    shards = [shard_indices(n, rank=r, world_size=world) for r in range(world)]
    joined = torch.cat(shards)
    assert sorted(joined.tolist()) == list(range(n))  # disjoint, complete, no padding duplicates
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    assert all(s.tolist() == list(range(r, n, world)) for r, s in enumerate(shards))


def test_shard_indices_errors():
    with pytest.raises(ValidationError, match=r"rank: expected an integer in \[0, 2\), got 2"):
        shard_indices(4, rank=2, world_size=2)
    with pytest.raises(ValidationError, match="n: expected an integer >= 0"):
        shard_indices(-1)


def test_rank_seed_is_a_fixed_function_of_seed_epoch_rank():
    seeds = {(s, e, r): rank_seed(s, epoch=e, rank=r) for s in (0, 1) for e in (0, 1) for r in (0, 1, 2)}
    assert len(set(seeds.values())) == len(seeds)
    assert rank_seed(5, epoch=2) == rank_seed(5, epoch=2, rank=0)  # no process group: rank 0
    assert all(0 <= v < 2 ** 64 for v in seeds.values())
    from cmda_data.core._seeding import hash_ints, row_generator

    assert rank_seed(3, epoch=1, rank=2) == hash_ints(0x5EED_0002, 3, 1, 2)  # the entry points' hash, own tag
    row = torch.rand(3, generator=row_generator(3, 1, 0, rank=2))
    assert not torch.equal(row, torch.rand(3, generator=rank_generator(3, epoch=1, rank=2)))
    with pytest.raises(ValidationError, match="rank: expected an integer >= 0"):
        rank_seed(0, rank=-1)
    with pytest.raises(ValidationError, match="epoch: expected an integer >= 0"):
        rank_generator(0, epoch=-1)


def test_set_epoch_reaches_sampler_dataset_collate_and_pipeline_stages():
    from cmda_data.augment.buffer import CandidateBuffer

    data = make_data()
    bank = EmbeddingBank.build(data, ElementwiseAligner(), student="image", teachers="text", progress=False,
                               fit_gmm=False)
    aug = CrossModalAugmentedDataset(data, bank, intra=None)
    sampler = DistributedSampler(aug, num_replicas=2, rank=1, shuffle=True, seed=3)
    collate = CMDACollate(bank, intra=None)
    loader = DataLoader(IndexedDataset(data), sampler=sampler, batch_size=2, collate_fn=collate)
    found = set_epoch(4, loader, aug)
    assert {type(o).__name__ for o in found} == {"DistributedSampler", "CMDACollate", "CrossModalAugmentedDataset"}
    assert sampler.epoch == collate.epoch == aug.epoch == 4

    class Pipeline:  # what a wds.DataPipeline looks like to set_epoch: a list of stages
        pipeline = [lambda src: src, CandidateBuffer(bank, intra=None)]

    (stage,) = set_epoch(2, Pipeline())
    assert stage.epoch == 2
    with pytest.raises(ValidationError, match="objects: expected at least one object with set_epoch"):
        set_epoch(1, [1, 2])
    with pytest.raises(ValidationError, match="epoch: expected an integer >= 0"):
        set_epoch(-1, sampler)


def test_rank_none_means_the_process_rank_without_a_process_group():
    """rank=None resolves to torch.distributed's rank (0 when no group is initialised)."""
    from cmda_data.options import MixOptions

    assert MixOptions().rank is None
    assert MixOptions(rank=None).resolved().rank == 0
    assert MixOptions(rank=3).resolved().rank == 3
