"""Dataset wrappers: IndexedDataset (samples carry their index) and CrossModalAugmentedDataset.

:class:`CrossModalAugmentedDataset` is CMDA at the sample level (offline CMDA): item ``i``
is, with probability ``p``, replaced by the mix of the student fields of partners chosen
from a random candidate pool by teacher ``i``'s weights (Eq. 10/11). Only the partners
with non-zero weight are read from the wrapped dataset, which is never modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..bank._plan import row_draws
from ..core._fields import Field
from ..core._seeding import draw_pools, epoch_order, get_rank, get_world_size, pool_block
from ..core._validation import check_bool, check_int, fail
from ..exceptions import FieldError, ShapeError
from ..options import MixOptions
from ._base import MixingBase
from ._batch import check_cpu_bank_in_workers
from ._sample import mix_samples

__all__ = ["CrossModalAugmentedDataset", "IndexedDataset", "PoolOrderSampler"]


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that every sample carries its dataset index.

    The rule: a dict sample gets a new key ``index_field`` (a copy of the dict; the key
    must not exist yet); a tuple or list sample gets the index appended as its last element
    (``(image, text, label) -> (image, text, label, index)``, so positions of the original
    fields do not change); any other sample ``x`` becomes ``(x, index)``.

    Examples:
        >>> data = IndexedDataset([{"x": 1}, {"x": 2}])
        >>> data[1]
        {'x': 2, 'index': 1}
        >>> IndexedDataset([(10, 0), (20, 1)])[0]
        (10, 0, 0)
    """

    def __init__(self, dataset: Any, index_field: str = "index") -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            fail("dataset", "a map-style dataset (with __getitem__ and __len__)", dataset)
        if not isinstance(index_field, str) or not index_field:
            fail("index_field", "a non-empty field name (str)", index_field)
        self.dataset = dataset
        self.index_field = index_field

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        if isinstance(sample, Mapping):
            if self.index_field in sample:
                fail(f"field {self.index_field!r} of sample {index}", "a field name not used by the samples "
                     "(choose another index_field)", "a sample that already has it", FieldError, raw=True)
            out = dict(sample)
            out[self.index_field] = index
            return out
        if isinstance(sample, (tuple, list)):
            return (*sample, index)
        return (sample, index)


class CrossModalAugmentedDataset(MixingBase, Dataset):
    """A map-style dataset whose items are, with probability ``p``, CMDA-generated samples.

    Item ``i``'s draws depend on ``(seed, epoch, rank, i)`` only (not on the worker that
    reads it): whether it is mixed and which teacher guides it. Its candidate pool of
    ``pool_size`` dataset indices (itself included unless ``exclude_self``; the whole dataset
    when ``pool_size >= len(dataset)``) is its block of the epoch's random order of the
    dataset, a function of ``(seed, epoch, i)``: the order is cut into consecutive blocks, so
    the items of one block share their candidates (each pool is still a uniform random set of
    other samples). Load the items in that order with :meth:`sampler` and a batch holds the
    partners of its items: each sample is read once, as with the collate. With any other
    sampler the items are the same, but a mixed item reads its partners from the wrapped
    dataset (about 4 reads per item with the default options). Teacher ``i``'s DCA weights over the pool keep the
    ``top_k`` best partners; the student field becomes their weighted sum, the target the
    soft target ``[C]`` (float32, sums to 1, also for items that are not mixed) and a
    ``mix_info`` field records ``"index"`` (i), ``"partners"`` [k] dataset indices,
    ``"weights"`` [k], ``"mixed"`` and ``"teacher"``, fixed-size tensors that
    ``default_collate`` stacks. Items that are not mixed carry the identity (partners all
    ``i``, weights ``[1, 0, ...]``). Only the partners with a non-zero weight are read from
    the wrapped dataset, which is never modified.

    With the pool covering the dataset, item ``i`` equals row ``i`` of
    :class:`~cmda_data.CMDACollate` (and :class:`~cmda_data.CMDAugment`) over one batch
    holding the whole dataset with the same options: all build plans in one place.

    ``keep_real=True``: ``2N`` items, the ``N`` originals unchanged, then ``N`` generated ones
    (always mixed when a partner exists).

    Args:
        dataset: the map-style dataset (dict or tuple samples); never modified.
        bank: an :class:`~cmda_data.EmbeddingBank` with one row per sample of ``dataset``.
        options: the :class:`~cmda_data.MixOptions` (default ``MixOptions()``); its fields
            may also be given as keyword arguments (``p=1.0, top_k=4``), which override it.
        student: the student modality (default: the bank's).
        teachers: the teacher modality or modalities (default: the bank's).
        target: field of the class index / class scores (None: none).
        num_classes: C, needed for class-index targets.
        fields: modality -> sample field (default: the modality name; ints for tuples).
        info_key: name of the mix record in dict samples (tuples: appended last).

    Examples:
        >>> from cmda_data.bank import EmbeddingBank
        >>> z = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
        >>> bank = EmbeddingBank({"image": z, "text": z}, student="image", teachers="text")
        >>> data = [{"image": torch.full((2,), float(i)), "label": i % 3} for i in range(6)]
        >>> aug = CrossModalAugmentedDataset(data, bank, target="label", num_classes=3, p=1.0,
        ...                                  pool_size=4, top_k=2, intra=None)
        >>> item = aug[0]
        >>> item["label"].sum().item(), item["mix_info"]["partners"].shape
        (1.0, torch.Size([2]))
        >>> loader = torch.utils.data.DataLoader(aug, batch_size=4, sampler=aug.sampler())
        >>> sum(len(batch["label"]) for batch in loader)
        6
    """

    def __init__(self, dataset: Any, bank: Any, options: Optional[MixOptions] = None, *,
                 student: Optional[str] = None, teachers: Optional[Union[str, Sequence[str]]] = None,
                 target: Optional[Field] = None, num_classes: Optional[int] = None,
                 fields: Optional[Mapping[str, Field]] = None, info_key: str = "mix_info", **mix_kwargs: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            fail("dataset", "a map-style dataset (with __getitem__ and __len__)", dataset)
        self._setup(bank, options, mix_kwargs, owner="CrossModalAugmentedDataset", student=student,
                    teachers=teachers, target=target, num_classes=num_classes, fields=fields, info_key=info_key,
                    index_optional=True)
        n = len(dataset)
        if bank.indices is not None or len(bank) != n:
            fail("bank", f"one row per sample of the dataset ({n} rows)",
                 f"a bank with {len(bank)} rows" + (" on a subset of indices" if bank.indices is not None else ""),
                 ShapeError, raw=True)
        self.dataset = dataset
        o = self.options
        self.pool_size = o.pool_size
        self._pool_len = min(o.pool_size, n - 1) if o.exclude_self else min(o.pool_size, n)
        if self._pool_len < 1:
            fail("exclude_self", "False for a dataset of one sample (no other partner)", o.exclude_self)
        self.k = self._pool_len if o.top_k is None else min(o.top_k, self._pool_len)
        self._block = pool_block(self._pool_len, not o.exclude_self)

    def __len__(self) -> int:
        n = len(self.dataset)
        return 2 * n if self.options.keep_real else n

    def __repr__(self) -> str:
        return f"CrossModalAugmentedDataset(n={len(self.dataset)}, pool_size={self.pool_size}, {self._options_repr()})"

    # -- items -----------------------------------------------------------------------------
    def _pools(self, indices: Sequence[int]) -> torch.Tensor:
        """``[len(indices), pool]`` sorted candidate pools of dataset ``indices`` (see :func:`draw_pools`)."""
        return draw_pools(indices, seed=self.spec.seed, epoch=self.epoch, n=len(self.dataset),
                          size=self._pool_len, include_self=not self.options.exclude_self)

    def pool(self, index: int) -> torch.Tensor:
        """The sorted candidate pool of dataset ``index`` this epoch (its block of the epoch order)."""
        index = check_int("index", index)
        if not 0 <= index < len(self.dataset):
            raise IndexError(f"index: expected a dataset index in [0, {len(self.dataset)}), got {index}")
        return self._pools([index])[0]

    @property
    def block_size(self) -> int:
        """Consecutive items of :meth:`sampler` that share one pool: ``pool_size`` (``+ 1`` with
        ``exclude_self``; at most the dataset), twice that with ``keep_real`` (a block's real
        items, then the same items generated). A batch size that is a multiple of it keeps every
        pool inside one batch."""
        return self._block * (2 if self.options.keep_real else 1)

    def order(self) -> torch.Tensor:
        """``[N]`` the dataset indices in this epoch's order, a random permutation of ``(seed, epoch)``.

        The pools are its consecutive blocks of ``pool_size`` positions (``+ 1`` with
        ``exclude_self``); the last block is the final full block of positions, so it may share
        items with the one before. The same on every rank.
        """
        n = len(self.dataset)
        return torch.from_numpy(epoch_order(np.arange(n), n=n, seed=self.spec.seed, epoch=self.epoch, inverse=True))

    def sampler(self, *, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                drop_last: bool = False) -> "PoolOrderSampler":
        """A sampler that loads the items in this epoch's order (see :class:`PoolOrderSampler`).

        ``DataLoader(aug, batch_size=B, sampler=aug.sampler())`` in place of ``shuffle=True``:
        the same items, in a random order, with the partners of a batch's items inside the
        batch when ``B`` is a multiple of :attr:`block_size`, so each sample is read once
        instead of about 4 times.
        """
        return PoolOrderSampler(self, num_replicas=num_replicas, rank=rank, drop_last=drop_last)

    def _item(self, item: Any) -> int:
        item = item if type(item) is int else check_int("index", item)
        if item < 0:
            item += len(self)
        if not 0 <= item < len(self):
            raise IndexError(f"index: expected an integer in [0, {len(self)}), got {item}")
        return item

    def __getitem__(self, item: int) -> Any:
        return self._items([self._item(item)])[0]

    def __getitems__(self, indices: Sequence[int]) -> List[Any]:
        """The items ``indices`` at once (a DataLoader's batch): exactly ``[self[i] for i in indices]``.

        The draws, the pools, the plans (one :func:`~cmda_data.bank._plan.bank_plan` call with
        one pool per item) and the mixing are vectorised over the items, and each sample is read
        once. Every value is computed item by item, so the items are the same as one at a time;
        an error is the one of the first item that fails on its own.
        """
        size = len(self)
        items = [item if type(item) is int and 0 <= item < size else self._item(item) for item in indices]
        try:
            return self._items(items)
        except Exception:
            if len(items) > 1:
                for item in items:  # raise the error of the first item that fails alone
                    self._items([item])
            raise

    def _items(self, items: List[int]) -> List[Any]:
        n = len(self.dataset)
        check_cpu_bank_in_workers(self.bank, "CrossModalAugmentedDataset")
        base = [item - n if item >= n else item for item in items]
        mixed, teacher = row_draws(torch.tensor(base, dtype=torch.long), self._current_spec(), self.epoch)
        if self.options.keep_real:  # the first N items are the originals, the next N generated
            mixed = torch.tensor([item >= n for item in items], dtype=torch.bool)
        rows = mixed.nonzero().reshape(-1).tolist()
        pools = self._pools([base[r] for r in rows]) if rows else None
        read: Dict[int, Any] = {}
        for index in base:  # each sample read once
            if index not in read:
                read[index] = self.dataset[index]
        return mix_samples(self, [read[index] for index in base], base, mixed=mixed, teacher=teacher,
                           width=self.k, pools=pools, fetch=self.dataset.__getitem__)


#: positions of the sampler's sequence computed at a time
_SAMPLER_CHUNK = 1 << 16


class PoolOrderSampler(Sampler):
    """The items of a :class:`CrossModalAugmentedDataset` in its epoch order: pools stay together.

    Yields the dataset indices in :meth:`CrossModalAugmentedDataset.order` (a random
    permutation, new each epoch: use it in place of ``shuffle=True``). The items of one pool
    block are consecutive, so a batch whose size is a multiple of ``dataset.block_size`` holds
    the partners of its mixed items, which ``__getitems__`` then reads once. With
    ``keep_real=True`` each block's real items come first, then its generated ones (``i + N``):
    a batch holds both.

    The epoch is the dataset's: :meth:`set_epoch` sets it (on the dataset, reaching its
    workers), like ``DistributedSampler.set_epoch``. Distributed: ``num_replicas`` ranks
    (default: the process group's world size) take consecutive equal shares of the order
    (a block cut by a share's edge costs its items a few partner reads), the last ones topped
    up from its start unless ``drop_last``, as ``DistributedSampler`` does. The epoch is read
    once per pass, when iteration starts.

    Examples:
        >>> from cmda_data.bank import EmbeddingBank
        >>> z = torch.nn.functional.normalize(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), dim=1)
        >>> bank = EmbeddingBank({"image": z, "text": z}, student="image", teachers="text")
        >>> aug = CrossModalAugmentedDataset([{"image": torch.zeros(2)}] * 10, bank, pool_size=5, intra=None)
        >>> order = list(aug.sampler())
        >>> sorted(order) == list(range(10)), set(aug.pool(order[0]).tolist()) == set(order[:5])
        (True, True)
    """

    def __init__(self, dataset: CrossModalAugmentedDataset, *, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, drop_last: bool = False) -> None:
        if not isinstance(dataset, CrossModalAugmentedDataset):
            fail("dataset", "a CrossModalAugmentedDataset", dataset)
        num_replicas = get_world_size() if num_replicas is None else check_int("num_replicas", num_replicas, minimum=1)
        rank = get_rank() if rank is None else check_int("rank", rank, minimum=0)
        if rank >= num_replicas:
            fail("rank", f"an integer in [0, {num_replicas}) (num_replicas={num_replicas})", rank)
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.drop_last = check_bool("drop_last", drop_last)

    def __len__(self) -> int:
        total = len(self.dataset)
        return total // self.num_replicas if self.drop_last else -(-total // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Set the dataset's epoch (its draws and this order), also in its worker processes."""
        self.dataset.set_epoch(epoch)

    def items_at(self, at: np.ndarray, epoch: Optional[int] = None) -> np.ndarray:
        """The items at positions ``at`` of an epoch's sequence (all ranks' shares, in order; default: this epoch)."""
        aug = self.dataset
        n, seed = len(aug.dataset), aug.spec.seed
        epoch = aug.epoch if epoch is None else epoch
        if not aug.options.keep_real:
            return epoch_order(at, n=n, seed=seed, epoch=epoch, inverse=True)
        block = aug._block  # the sequence: each block of the order, then the same block generated (+ n)
        start = at // (2 * block) * block
        offset = at - 2 * start
        length = np.minimum(block, n - start)
        generated = offset >= length
        items = epoch_order(start + offset - generated * length, n=n, seed=seed, epoch=epoch, inverse=True)
        return items + generated * n

    def __iter__(self) -> Iterator[int]:
        total, share, epoch = len(self.dataset), len(self), self.dataset.epoch  # (one epoch for the whole pass)
        first = self.rank * share
        for at in range(first, first + share, _SAMPLER_CHUNK):  # (O(chunk) memory for any dataset size)
            positions = np.arange(at, min(at + _SAMPLER_CHUNK, first + share)) % total  # (% : the top-up)
            yield from self.items_at(positions, epoch).tolist()
