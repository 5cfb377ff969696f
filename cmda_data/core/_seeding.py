"""Deterministic per-row random streams (private).

Every random draw of the entry points (is a row mixed, which teacher guides it) is a
counter-based function of ``(seed, epoch, rank, dataset index)`` only; the dataset's
candidate pools come from the epoch order (:func:`epoch_order`, a keyed permutation of the
dataset that depends on ``(seed, epoch)``). The integers are mixed with splitmix64, a
fixed 64-bit hash (never Python's salted ``hash()``), so a row gets the same draws in the
main process and in any DataLoader worker, whatever ``num_workers`` or
``persistent_workers`` are.

The epoch lives in :class:`SharedEpoch`, a one-element ``int64`` tensor in shared memory:
``set_epoch`` in the main process is seen by worker processes that already exist
(``persistent_workers=True``), because forked or spawned workers map the same memory.
The mixing probability lives in :class:`SharedProbability` the same way (``set_p``: a
share of mixed rows that changes during training, e.g. the paper's attenuation
coefficient); a row's draws are then a function of ``(seed, epoch, rank, index, p)``.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ._validation import check_int, check_probability, fail

__all__ = ["SharedEpoch", "SharedProbability", "draw_pools", "draw_row", "draw_rows", "epoch_order", "get_rank", "get_world_size",
           "hash_ints", "is_distributed", "pool_block", "row_generator", "splitmix64"]

_MASK = (1 << 64) - 1

# stream tags, so that different uses of one row never share a seed
_STREAM_ROW = 0x5EED_0001
_GAMMA = 0x9E3779B97F4A7C15


_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _splitmix64(values: Any) -> np.ndarray:
    """splitmix64 of every element of a uint64 array (vectorised): the one implementation."""
    with np.errstate(over="ignore"):
        z = np.asarray(values, dtype=np.uint64) + np.uint64(_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        return z ^ (z >> np.uint64(31))


def splitmix64(value: int) -> int:
    """One splitmix64 step: a fixed bijective mix of a 64-bit integer.

    Examples:
        >>> splitmix64(0)
        16294208416658607535
        >>> splitmix64(0) == splitmix64(0)
        True
    """
    return int(_splitmix64(int(value) & _MASK))


def hash_ints(*values: int) -> int:
    """Hash a sequence of integers (any sign) to one 64-bit seed, order-sensitive.

    Examples:
        >>> hash_ints(1, 2) == hash_ints(1, 2), hash_ints(1, 2) == hash_ints(2, 1)
        (True, False)
    """
    state = 0x243F6A8885A308D3  # digits of pi: a fixed, arbitrary start
    for value in values:
        state = splitmix64(state ^ (int(value) & _MASK))
    return state


def row_generator(seed: int, epoch: int, index: int, rank: int = 0) -> torch.Generator:
    """A CPU generator whose stream depends on ``(seed, epoch, rank, index)`` only.

    Args:
        seed: the user's seed.
        epoch: the epoch (see ``set_epoch`` of the entry points).
        index: the dataset index of the row (or its position when no index is known).
        rank: the distributed rank (0 when not distributed).

    Returns:
        A new ``torch.Generator`` on the CPU.

    Examples:
        >>> a = torch.rand(3, generator=row_generator(0, 1, 42))
        >>> b = torch.rand(3, generator=row_generator(0, 1, 42))
        >>> bool(torch.equal(a, b))
        True
        >>> bool(torch.equal(a, torch.rand(3, generator=row_generator(0, 2, 42))))
        False
    """
    generator = torch.Generator()
    generator.manual_seed(hash_ints(_STREAM_ROW, seed, epoch, rank, index))
    return generator


def _uniforms(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1), element-wise (broadcast): output ``c`` of a row key is
    ``splitmix64(key + (c + 1) * gamma) >> 11`` / 2**53 (the splitmix64 stream seeded with the key)."""
    with np.errstate(over="ignore"):
        z = _splitmix64(np.asarray(keys).astype(np.uint64) + np.asarray(counters).astype(np.uint64) * np.uint64(_GAMMA))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _uniforms_from_keys(keys: np.ndarray, count: int) -> np.ndarray:
    """``[n, count]`` uniforms in [0, 1): outputs ``0 .. count - 1`` of each row key (:func:`_uniforms`)."""
    return _uniforms(np.asarray(keys)[:, None], np.arange(count)[None, :])


def _row_keys(indices: Iterable[int], seed: int, epoch: int, rank: int) -> np.ndarray:
    """``[n]`` uint64 row keys ``hash_ints(tag, seed, epoch, rank, index)`` (the :func:`row_generator` seeds)."""
    prefix = np.uint64(hash_ints(_STREAM_ROW, seed, epoch, rank))
    index = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64).reshape(-1)
    return _splitmix64(prefix ^ index.astype(np.uint64))


#: the epoch order (:func:`epoch_order`) has its own stream
_STREAM_ORDER = 0x5EED_0002
#: up to this many samples the order is an explicit permutation (exactly uniform); beyond, a Feistel network
_EXPLICIT_ORDER_MAX = 1 << 21
_FEISTEL_ROUNDS = 8


def _feistel(x: np.ndarray, keys: np.ndarray, half: int, inverse: bool) -> np.ndarray:
    """A keyed bijection of ``[0, 4**half)`` (balanced Feistel network, splitmix64 rounds), element-wise."""
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    left, right = x >> shift, x & mask
    if inverse:
        for key in keys[::-1]:
            left, right = right ^ (_splitmix64(key ^ left) & mask), left
    else:
        for key in keys:
            left, right = right, left ^ (_splitmix64(key ^ right) & mask)
    return (left << shift) | right


@functools.lru_cache(maxsize=2)
def _explicit_order(n: int, seed: int, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(order, position)``: the indices sorted by their splitmix64 keys, and its inverse (read-only)."""
    keys = _splitmix64(np.uint64(hash_ints(_STREAM_ORDER, seed, epoch)) ^ np.arange(n, dtype=np.uint64))
    order = np.argsort(keys, kind="stable")
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    order.flags.writeable = position.flags.writeable = False
    return order, position


def epoch_order(values: Iterable[int], *, n: int, seed: int, epoch: int, inverse: bool = False) -> np.ndarray:
    """The epoch's random order of ``[0, n)``: dataset index -> position (``inverse``: position -> index).

    A random permutation that depends on ``(seed, epoch)`` only: the same in every process,
    and not a function of the rank, so every rank sees one order. Up to 2**21 samples it is
    the indices sorted by a splitmix64 key each (a uniformly random permutation, computed once
    per epoch and process, 16 bytes per sample); beyond, a Feistel network over
    ``[0, 4**h) >= n`` keyed by the seed and the epoch, walked until it lands in ``[0, n)``
    (a pseudo-random permutation with halves of at least 11 bits, computed for the values
    asked for only: O(1) memory for any ``n``).

    Examples:
        >>> order = epoch_order(range(10), n=10, seed=0, epoch=0)
        >>> sorted(order.tolist()) == list(range(10))
        True
        >>> epoch_order(order, n=10, seed=0, epoch=0, inverse=True).tolist() == list(range(10))
        True
    """
    x = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.int64).reshape(-1)
    if n <= _EXPLICIT_ORDER_MAX:
        order, position = _explicit_order(n, seed & _MASK, epoch)
        return (order if inverse else position)[x]
    half = ((n - 1).bit_length() + 1) // 2
    keys = _splitmix64(np.uint64(hash_ints(_STREAM_ORDER, seed, epoch)) ^ np.arange(_FEISTEL_ROUNDS, dtype=np.uint64))
    y = _feistel(x.astype(np.uint64), keys, half, inverse)
    walk = np.nonzero(y >= np.uint64(n))[0]
    while len(walk):  # cycle walking: apply again until inside [0, n) (a bijection of [0, n) results)
        y[walk] = _feistel(y[walk], keys, half, inverse)
        walk = walk[y[walk] >= np.uint64(n)]
    return y.astype(np.int64)


def pool_block(size: int, include_self: bool) -> int:
    """Samples per block of the epoch order: a pool of ``size`` plus the row itself when it is left out."""
    return size + (0 if include_self else 1)


def draw_pools(indices: Iterable[int], *, seed: int, epoch: int, n: int, size: int,
               include_self: bool) -> torch.Tensor:
    """``[len(indices), size]`` sorted candidate pools of dataset indices in ``[0, n)``.

    The epoch order (:func:`epoch_order`) is cut into consecutive blocks of
    ``s = size`` positions (``size + 1`` when not ``include_self``; the last block is the
    final ``s`` positions, so every block is full). Row ``r``'s pool is the block holding its
    own index (that index removed unless ``include_self``): the other members are a uniform
    random subset of the other ``n - 1`` indices, a function of ``(seed, epoch, index)`` only,
    vectorised over rows. Rows of one block share their candidates: reading the items in the
    epoch order (:meth:`~cmda_data.CrossModalAugmentedDataset.sampler`) finds every partner
    in the same batch.

    Examples:
        >>> pools = draw_pools([3, 8], seed=0, epoch=0, n=10, size=4, include_self=True)
        >>> pools.shape, bool((pools == torch.tensor([[3], [8]])).any(1).all())
        (torch.Size([2, 4]), True)
        >>> torch.equal(pools[1:], draw_pools([8], seed=0, epoch=0, n=10, size=4, include_self=True))
        True
    """
    index = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64).reshape(-1)
    block = pool_block(size, include_self)
    if size < 1:
        fail("size", "a pool of at least 1 index", size)
    if block > n:
        fail("size", f"a pool of at most {n - (0 if include_self else 1)} indices", size)
    if block == n:  # the whole dataset
        members = np.broadcast_to(np.arange(n), (len(index), n))
    else:
        position = epoch_order(index, n=n, seed=seed, epoch=epoch)
        start = np.minimum(position // block * block, n - block)
        members = epoch_order((start[:, None] + np.arange(block)).reshape(-1), n=n, seed=seed, epoch=epoch,
                              inverse=True).reshape(len(index), block)
    if not include_self:  # each row holds its own index exactly once: drop it
        members = members[members != index[:, None]].reshape(len(index), block - 1)
    return torch.from_numpy(np.sort(members, axis=1))


def _decide(u: np.ndarray, p: float, n_teachers: int) -> Tuple[np.ndarray, np.ndarray]:
    teacher = np.minimum((u[:, 1] * n_teachers).astype(np.int64), n_teachers - 1)
    return u[:, 0] < p, teacher


def draw_row(generator: torch.Generator, p: float, n_teachers: int) -> Tuple[bool, int]:
    """``(mixed, teacher_choice)`` of the row whose generator came from :func:`row_generator`.

    The two uniforms are counter-based outputs of the generator's seed (the row key), not
    draws from its stream: the generator is not advanced, so later draws from it (the
    dataset's candidate pool) do not depend on them, and :func:`draw_rows` computes the
    same values for many rows at once.

    Examples:
        >>> draw_row(row_generator(0, 0, 7), 0.5, 3) == tuple(
        ...     v.item() for v in draw_rows([7], seed=0, epoch=0, rank=0, p=0.5, n_teachers=3))
        True
    """
    keys = np.array([generator.initial_seed()], dtype=np.uint64)
    mixed, teacher = _decide(_uniforms_from_keys(keys, 2), p, n_teachers)
    return bool(mixed[0]), int(teacher[0])


def draw_rows(indices: Iterable[int], *, seed: int, epoch: int, rank: int, p: float,
              n_teachers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mixed [n] bool, teacher_choice [n] long)`` for rows with the given dataset indices.

    Row ``r`` (key ``hash_ints(tag, seed, epoch, rank, index_r)``, the seed of its
    :func:`row_generator`) is mixed when its first uniform is below ``p``; its teacher is
    ``floor(second uniform * n_teachers)``. Vectorised over rows.

    Examples:
        >>> mixed, teacher = draw_rows([0, 1, 2], seed=0, epoch=0, rank=0, p=1.0, n_teachers=1)
        >>> mixed.tolist(), teacher.tolist()
        ([True, True, True], [0, 0, 0])
    """
    keys = _row_keys(indices, seed, epoch, rank)
    mixed, teacher = _decide(_uniforms_from_keys(keys, 2), p, n_teachers)
    return torch.from_numpy(mixed.copy()), torch.from_numpy(teacher)


class _SharedScalar:
    """One number in a one-element shared-memory tensor (read by DataLoader workers)."""

    _dtype: torch.dtype

    def __init__(self, value: Any) -> None:
        self._value = torch.zeros(1, dtype=self._dtype)
        try:
            self._value.share_memory_()
        except RuntimeError:  # pragma: no cover - no shared memory: a private value still works
            pass
        self.set(value)

    def _check(self, value: Any) -> Any:
        raise NotImplementedError

    def get(self) -> Any:
        """The current value (read from the shared memory directly: CPU memory, never a device sync)."""
        return self._value.numpy()[0].item()

    def set(self, value: Any) -> None:
        """Set the value (checked); seen by all processes sharing it."""
        self._value[0] = self._check(value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.get()})"


class SharedEpoch(_SharedScalar):
    """An epoch counter that DataLoader worker processes share with the main process.

    The value is a one-element ``int64`` tensor in shared memory. Workers created by
    ``fork`` or ``spawn`` map the same memory, so :meth:`set` in the main process reaches
    persistent workers before the next ``iter(loader)``. A plain ``pickle`` round trip
    gives an independent copy holding the current value.

    Examples:
        >>> epoch = SharedEpoch(3)
        >>> epoch.set(4)
        >>> epoch.get()
        4
    """

    _dtype = torch.int64

    def __init__(self, epoch: int = 0) -> None:
        super().__init__(epoch)

    def _check(self, value: Any) -> int:
        return check_int("epoch", value, minimum=0)


class SharedProbability(_SharedScalar):
    """A probability that DataLoader worker processes share with the main process.

    A one-element ``float64`` tensor in shared memory, like :class:`SharedEpoch`: :meth:`set`
    in the main process reaches persistent workers before the next ``iter(loader)``. A
    Python float round-trips exactly, so :meth:`get` returns the value given to :meth:`set`.

    Examples:
        >>> p = SharedProbability(0.5)
        >>> p.set(0.25)
        >>> p.get()
        0.25
    """

    _dtype = torch.float64

    def __init__(self, p: float = 1.0) -> None:
        super().__init__(p)

    def _check(self, value: Any) -> float:
        return check_p(value)


def check_seed(seed: Any) -> int:
    """A seed is any integer (negative ones are folded into 64 bits by the hash)."""
    return check_int("seed", seed)


def check_p(p: Any) -> float:
    """Probability that a row is mixed."""
    return check_probability("p", p)


# --------------------------------------------------------------------------- ranks
def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return bool(dist.is_available() and dist.is_initialized())


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when no process group is initialised)."""
    return int(dist.get_rank(group)) if is_distributed() else 0


def get_world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (1 when no process group is initialised)."""
    return int(dist.get_world_size(group)) if is_distributed() else 1
