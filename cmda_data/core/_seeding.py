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

from ._validation import check_int, check_probability

__all__ = ["SharedEpoch", "SharedProbability", "draw_row", "draw_rows", "get_rank", "get_world_size", "hash_ints",
           "is_distributed", "row_generator", "splitmix64"]

_MASK = (1 << 64) - 1

# stream tags, so that different uses of one row never share a seed
_STREAM_ROW = 0x5EED_0001
_GAMMA = 0x9E3779B97F4A7C15


def splitmix64(value: int) -> int:
    """One splitmix64 step: a fixed bijective mix of a 64-bit integer.

    Examples:
        >>> splitmix64(0)
        16294208416658607535
        >>> splitmix64(0) == splitmix64(0)
        True
    """
    z = (value + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


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


def _uniforms_from_keys(keys: np.ndarray, count: int) -> np.ndarray:
    """``[n, count]`` uniforms in [0, 1): output k of row r is splitmix64(key_r + k * gamma) >> 11, / 2**53."""
    steps = (np.arange(count, dtype=np.uint64) + np.uint64(1)) * np.uint64(_GAMMA)
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64)[:, None] + steps[None, :]
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


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
    prefix = np.uint64(hash_ints(_STREAM_ROW, seed, epoch, rank))
    index = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64).reshape(-1)
    with np.errstate(over="ignore"):  # splitmix64(prefix ^ index), vectorised (= row_generator's seed)
        z = (prefix ^ index.astype(np.uint64)) + np.uint64(_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        keys = z ^ (z >> np.uint64(31))
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
