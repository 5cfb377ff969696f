"""Deterministic per-row random streams (private).

Every random draw of the entry points (is a row mixed, which teacher guides it, which
candidates form its pool) comes from a :class:`torch.Generator` that depends on
``(seed, epoch, rank, dataset index)`` only. The integers are mixed with splitmix64, a
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

from typing import Any, Iterable, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ._validation import check_int, check_probability, fail

__all__ = ["SharedEpoch", "SharedProbability", "draw_pools", "draw_row", "draw_rows", "get_rank", "get_world_size",
           "hash_ints", "is_distributed", "row_generator", "splitmix64"]

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


#: the pool's draws are outputs 2, 3, ... of the row key (0 and 1 are draw_rows' mixed and teacher)
_POOL_COUNTER = 2


def _distinct(keys: np.ndarray, need: int, others: int) -> np.ndarray:
    """``[n, need]`` distinct integers in ``[0, others)`` per row: a uniform random subset (unsorted).

    Row ``r`` uses outputs ``2, 3, ...`` of its key only, so its subset does not depend on the
    other rows. Dense (``4 * need >= others``): the ``need`` smallest of ``others`` uniforms.
    Sparse: uniform draws, a repeated value is drawn again from the row's next outputs until
    the row holds ``need`` distinct values (the first ``need`` distinct values of the row's
    stream of draws: a uniform subset).
    """
    n = len(keys)
    if 4 * need >= others:
        u = _uniforms(keys[:, None], _POOL_COUNTER + np.arange(others)[None, :])
        return np.argsort(u, axis=1, kind="stable")[:, :need]
    values = np.zeros((n, need), dtype=np.int64)
    holes = np.ones((n, need), dtype=bool)
    used = np.full(n, _POOL_COUNTER, dtype=np.int64)  # the next output of each row's stream
    while True:
        rows, cols = np.nonzero(holes)  # row-major: each row's holes in order
        if not len(rows):
            return values
        count = holes.sum(1)
        rank = np.arange(len(rows)) - (np.cumsum(count) - count)[rows]
        u = _uniforms(keys[rows], used[rows] + rank)
        values[rows, cols] = np.minimum((u * others).astype(np.int64), others - 1)
        used += count
        order = np.argsort(values, axis=1, kind="stable")  # a repeated value: its later copies are holes
        ranked = np.take_along_axis(values, order, 1)
        holes = np.zeros_like(holes)
        np.put_along_axis(holes, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], 1)


def draw_pools(indices: Iterable[int], *, seed: int, epoch: int, rank: int, n: int, size: int,
               include_self: bool) -> torch.Tensor:
    """``[len(indices), size]`` sorted candidate pools of dataset indices in ``[0, n)``.

    Row ``r``'s pool holds its own index when ``include_self``, and a uniform random subset of
    the other ``n - 1`` indices (all of them when ``size`` asks for that many), drawn from the
    row's key (:func:`draw_rows`' key, after its two draws): a function of
    ``(seed, epoch, rank, index)`` only, vectorised over rows.

    Examples:
        >>> pools = draw_pools([3, 8], seed=0, epoch=0, rank=0, n=10, size=4, include_self=True)
        >>> pools.shape, bool((pools == torch.tensor([[3], [8]])).any(1).all())
        (torch.Size([2, 4]), True)
        >>> torch.equal(pools[1:], draw_pools([8], seed=0, epoch=0, rank=0, n=10, size=4, include_self=True))
        True
    """
    index = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64).reshape(-1)
    need, others = size - (1 if include_self else 0), n - 1
    if not 0 <= need <= others:
        fail("size", f"a pool of at most {others + int(include_self)} indices", size)
    if need == others:
        chosen = np.broadcast_to(np.arange(others), (len(index), others))
    else:
        chosen = _distinct(_row_keys(index, seed, epoch, rank), need, others)
    chosen = chosen + (chosen >= index[:, None])  # skip the row's own index
    if include_self:
        chosen = np.concatenate([chosen, index[:, None]], axis=1)
    return torch.from_numpy(np.sort(chosen, axis=1))


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
