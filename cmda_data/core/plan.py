"""What was drawn for one batch: a :class:`MixPlan` (built by :mod:`cmda_data.core.build`).

All randomness of CMDA (which rows are mixed, which teacher guides a row) is drawn before a
plan is built: by :func:`~cmda_data.core.build.make_plan` from an explicit
``torch.Generator``, by the entry points from ``(seed, epoch, rank, index)``. Applying a plan is deterministic, and
the same plan is applied to every field of a batch (pixels, caption embeddings, labels).

Examples:
    >>> import torch
    >>> plan = MixPlan.from_dense(torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    >>> plan.apply(torch.tensor([[0.0, 2.0], [4.0, 6.0]]))
    tensor([[2., 4.],
            [4., 6.]])
    >>> plan.apply_targets(torch.tensor([0, 1]), num_classes=2)
    tensor([[0.5000, 0.5000],
            [0.0000, 1.0000]])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..exceptions import DeviceError, ShapeError
from . import functional as Fn
from ._kernels import (
    _check_float,
    _check_matrix,
    _check_samples,
    _normalize_rows,
    _targets_as_probabilities,
)
from ._validation import (
    check_float_tensor,
    check_int,
    check_label_smoothing,
    check_rank,
    fail,
)

__all__ = ["MixPlan"]


def _check_long(name: str, value: object, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64:
        fail(name, f"an int64 tensor with {ndim} dimension(s)", value)
    check_rank(name, value, ndim)
    return value


@dataclass(frozen=True, eq=False)
class MixPlan:
    """One batch's mixing decisions; apply it to any field with :meth:`apply`.

    Row ``r`` of every output is ``sum_t weights[r, t] * pool[index[r, t]]``.

    Attributes:
        index: ``[n, k]`` int64 positions (in the pool tensor given to :meth:`apply`) of the
            partners mixed into row ``r``.
        weights: ``[n, k]`` float32 non-negative weights; rows sum to 1 (only plans made with
            ``renormalize=False`` keep Alg. 1's unnormalised rows).
        teacher_index: ``[n]`` int64 position in the pool of the teacher sample of row ``r``.
        mixed: ``[n]`` bool, whether row ``r`` is generated. A row that is not mixed is the
            original: ``index[r, 0] == teacher_index[r]`` with weight 1, then zero weights.
        teacher: names of the teacher modalities (empty for a single unnamed teacher).
        teacher_choice: ``[n]`` int64 index into ``teacher`` of the teacher that guided row
            ``r`` (None for a single unnamed teacher).
        inter: the dense ``[n, m]`` inter-modal weights that produced the plan (or None).
        intra: the dense ``[n, m]`` intra-modal weights that produced the plan (or None).

    Examples:
        >>> plan = MixPlan(index=torch.tensor([[0, 1], [1, 1]]),
        ...                weights=torch.tensor([[0.25, 0.75], [1.0, 0.0]]),
        ...                teacher_index=torch.tensor([0, 1]), mixed=torch.tensor([True, False]))
        >>> plan
        MixPlan(n=2, k=2, mixed=1/2, teacher=())
        >>> plan.apply(torch.tensor([[4.0], [8.0]]))
        tensor([[7.],
                [8.]])
    """

    index: torch.Tensor
    weights: torch.Tensor
    teacher_index: torch.Tensor
    mixed: torch.Tensor
    teacher: Tuple[str, ...] = ()
    teacher_choice: Optional[torch.Tensor] = None
    inter: Optional[torch.Tensor] = None
    intra: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        index = _check_long("index", self.index, 2)
        weights = self.weights
        if not isinstance(weights, torch.Tensor) or weights.dtype != torch.float32:
            fail("weights", "a float32 tensor [n, k]", weights)
        check_float_tensor("weights", weights)
        if tuple(weights.shape) != tuple(index.shape):
            fail("weights", f"shape {tuple(index.shape)} to match index", weights, ShapeError)
        n, k = index.shape
        if k < 1:
            fail("index", "at least one column (k >= 1)", index, ShapeError)
        device = index.device
        for name in ("weights", "teacher_index", "mixed", "teacher_choice", "inter", "intra"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.device != device:
                fail(name, f"a tensor on {device} like index", value, DeviceError)
        teacher_index = _check_long("teacher_index", self.teacher_index, 1)
        if teacher_index.shape[0] != n:
            fail("teacher_index", f"{n} entries to match index", teacher_index, ShapeError)
        mixed = self.mixed
        if not isinstance(mixed, torch.Tensor) or mixed.dtype != torch.bool or mixed.shape != (n,):
            fail("mixed", f"a bool tensor of shape ({n},)", mixed)
        if not isinstance(self.teacher, tuple) or not all(isinstance(t, str) for t in self.teacher):
            if isinstance(self.teacher, (list, tuple)) and all(isinstance(t, str) for t in self.teacher):
                object.__setattr__(self, "teacher", tuple(self.teacher))
            else:
                fail("teacher", "a tuple of modality names (str)", self.teacher)
        if self.teacher_choice is not None:
            choice = _check_long("teacher_choice", self.teacher_choice, 1)
            if choice.shape[0] != n:
                fail("teacher_choice", f"{n} entries to match index", choice, ShapeError)
            if n and (int(choice.min()) < 0 or int(choice.max()) >= max(len(self.teacher), 1)):
                fail("teacher_choice", f"values in [0, {max(len(self.teacher), 1)}) (one per "
                     f"name in teacher={self.teacher})", choice)
        for name in ("inter", "intra"):
            value = getattr(self, name)
            if value is not None:
                check_float_tensor(name, value)
                check_rank(name, value, 2)
                if value.shape[0] != n:
                    fail(name, f"{n} rows to match index", value, ShapeError)
        if n == 0:
            return
        if int(index.min()) < 0 or int(teacher_index.min()) < 0:
            fail("index", "non-negative positions", f"minimum {int(index.min())}", raw=True)
        if bool((weights < 0).any()) or bool((weights.sum(1) <= 0).any()):
            fail("weights", "non-negative rows with a positive sum", weights)
        still = ~mixed
        if bool(still.any()):
            one_hot = torch.zeros_like(weights[still])
            one_hot[:, 0] = 1
            if not torch.equal(weights[still], one_hot) or not torch.equal(
                    index[still, 0], teacher_index[still]):
                fail("weights", "rows that are not mixed to be the original: index[r, 0] == "
                     "teacher_index[r] with weight 1, then weight 0", "other values", raw=True)

    @classmethod
    def _trusted(cls, index: torch.Tensor, weights: torch.Tensor, teacher_index: torch.Tensor,
                 mixed: torch.Tensor, teacher: Tuple[str, ...] = (), teacher_choice: Optional[torch.Tensor] = None,
                 inter: Optional[torch.Tensor] = None, intra: Optional[torch.Tensor] = None) -> "MixPlan":
        """A plan from tensors the library built itself from checked inputs: no :meth:`__post_init__` checks.

        Private: only for plans whose fields are valid by construction (never user input).
        """
        plan = object.__new__(cls)
        for name, value in (("index", index), ("weights", weights), ("teacher_index", teacher_index),
                            ("mixed", mixed), ("teacher", tuple(teacher)), ("teacher_choice", teacher_choice),
                            ("inter", inter), ("intra", intra)):
            object.__setattr__(plan, name, value)
        return plan

    # ------------------------------------------------------------------ properties
    @property
    def num_outputs(self) -> int:
        """Number of rows ``n`` the plan produces."""
        return int(self.index.shape[0])

    @property
    def k(self) -> int:
        """Partners per row."""
        return int(self.index.shape[1])

    @property
    def device(self) -> torch.device:
        return self.index.device

    def __repr__(self) -> str:
        mixed = int(self.mixed.sum()) if self.num_outputs else 0
        return (f"MixPlan(n={self.num_outputs}, k={self.k}, mixed={mixed}/{self.num_outputs}, "
                f"teacher={self.teacher})")

    # ------------------------------------------------------------------ conversions
    def to(self, device: Union[str, torch.device]) -> "MixPlan":
        """The same plan with every tensor on ``device``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in fields.items()}
        if all(moved[name] is value for name, value in fields.items()):
            return self  # already there (frozen: sharing is safe)
        plan = MixPlan._trusted(**moved)  # a checked plan stays valid on another device
        if getattr(self, "_pool", None) is not None:
            object.__setattr__(plan, "_pool", self._pool)
        return plan

    def dense(self, m: int) -> torch.Tensor:
        """The plan as a dense ``[n, m]`` float32 weight matrix over a pool of ``m`` samples."""
        m = check_int("m", m, minimum=1)
        need = int(self.index.max()) + 1 if self.index.numel() else 0
        if m < need:
            fail("m", f"a pool of at least {need} samples (the plan indexes position {need - 1})",
                 m)
        out = torch.zeros(self.num_outputs, m, dtype=torch.float32, device=self.device)
        return out.scatter_add_(1, self.index, self.weights)

    # ------------------------------------------------------------------ applying
    def _on(self, tensor: torch.Tensor, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(tensor, torch.Tensor):
            fail(name, "a torch.Tensor with the pool of samples along dim 0", tensor)
        if tensor.ndim < 1:
            fail(name, "a tensor with a leading sample dimension [m, ...]", tensor, ShapeError)
        index, weights = self.index.to(tensor.device), self.weights.to(tensor.device)
        bound = getattr(self, "_pool", None)  # a plan the builder made over `_pool` candidates
        if bound is None or tensor.shape[0] < bound:
            need = int(index.max()) + 1 if index.numel() else 0  # (one read-back)
            if tensor.shape[0] < need:
                fail(name, f"at least {need} samples along dim 0 (the plan indexes position "
                     f"{need - 1})", tensor, ShapeError)
        return index, weights

    def apply(self, tensor: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """Mix ``tensor`` ``[m, *S]`` (any trailing shape) into ``[n, *S]``.

        Rows that are not mixed are copies of the original samples (exactly). A plan with no
        mixed row may be applied to any dtype (e.g. token ids); mixing needs floating point.
        Partners are gathered (``k`` rows each) when ``k * 8 <= m``, else one dense product.

        Args:
            tensor: the pool ``[m, *S]``; floating point when a row is mixed (finite values).
            inplace: write the mixed rows into ``tensor`` and return it. Only for a square
                plan (``n == m`` and row ``r``'s own sample is ``r``, as the entry points'
                plans over a batch): the rows that are not mixed are already there, so only
                the mixed rows are computed (all of them before any is written).

        Examples:
            >>> plan = MixPlan.from_dense(torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
            >>> x = torch.tensor([[0.0], [2.0]])
            >>> plan.apply(x, inplace=True) is x, x.reshape(-1).tolist()
            (True, [1.0, 2.0])
        """
        index, weights = self._on(tensor, "tensor")
        mixed = self.mixed.to(tensor.device)
        if inplace:
            square = self.num_outputs == tensor.shape[0] and bool(torch.equal(
                self.teacher_index.to(tensor.device), torch.arange(tensor.shape[0], device=tensor.device)))
            if not square:
                fail("inplace", "False for a plan that is not square (n == m, row r's own sample at r)",
                     inplace)
            rows = mixed.nonzero().reshape(-1)
            if rows.numel() == 0:
                return tensor
            _check_pool(tensor)
            out = self._mix(index.index_select(0, rows), weights.index_select(0, rows), tensor)
            return tensor.index_copy_(0, rows, out.to(tensor.dtype))
        if not tensor.is_floating_point() and not bool(mixed.any()):  # token ids: copies, when nothing is mixed
            return tensor.index_select(0, index[:, 0])
        _check_pool(tensor)  # floating point (the plan itself was checked when it was made)
        return self._mix(index, weights, tensor)  # (rows not mixed: weight 1 on their own sample, exactly)

    @staticmethod
    def _mix(index: torch.Tensor, weights: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """``out[r] = sum_t weights[r, t] * tensor[index[r, t]]``: gathered, or one dense product.

        The samples are checked (finite values) by the kernels of :func:`functional.mix`, on
        the CPU while they are mixed (no second pass over them).
        """
        m = tensor.shape[0]
        if index.shape[1] * _SPARSE_RATIO <= m:
            if tensor.device.type == "cpu":  # the blocked CPU kernel checks the samples as it reads them
                return Fn._mix_checked(weights, tensor, index, m)
            _check_float("samples", tensor)
            return Fn._mix(weights, tensor, index)
        _check_float("samples", tensor)  # (one reduction, read back once)
        dense = torch.zeros(index.shape[0], m, dtype=torch.float32, device=tensor.device)
        return Fn._mix(dense.scatter_add_(1, index, weights), tensor)

    def apply_targets(self, targets: torch.Tensor, num_classes: Optional[int] = None,
                      label_smoothing: float = 0.0) -> torch.Tensor:
        """Soft labels ``[n, C]`` float32 for the mixed rows (see :func:`functional.mix_targets`)."""
        index, weights = self._on(targets, "targets")
        label_smoothing = check_label_smoothing("label_smoothing", label_smoothing)
        num_classes = check_int("num_classes", num_classes, minimum=1, allow_none=True)
        probs = _targets_as_probabilities(targets, num_classes, label_smoothing)
        return Fn._mix_targets(weights, probs, index)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, n: int, device: Union[str, torch.device, None] = None) -> "MixPlan":
        """A plan that returns the first ``n`` samples unchanged."""
        n = check_int("n", n, minimum=0)
        rows = torch.arange(n, device=device)
        return cls(index=rows[:, None].clone(), weights=torch.ones(n, 1, device=device),
                   teacher_index=rows, mixed=torch.zeros(n, dtype=torch.bool, device=device))

    @classmethod
    def from_dense(cls, weights: torch.Tensor, *, top_k: Optional[int] = None,
                   renormalize: bool = True, teacher_index: Optional[torch.Tensor] = None,
                   mixed: Optional[torch.Tensor] = None, teacher: Tuple[str, ...] = (),
                   teacher_choice: Optional[torch.Tensor] = None,
                   inter: Optional[torch.Tensor] = None,
                   intra: Optional[torch.Tensor] = None) -> "MixPlan":
        """A plan from dense ``[n, m]`` weights (e.g. :func:`functional.dca_weights`).

        A row whose weights keep all their mass on its own sample is the original sample:
        not mixed.

        Args:
            weights: ``[n, m]`` non-negative weights.
            top_k: keep the ``k`` largest weights per row (all ``m`` when None).
            renormalize: divide each row by its sum (False keeps the values as given).
            teacher_index: ``[n]`` pool position of each row's own sample (default
                ``arange(n)``); rows that are not mixed copy that sample.
            mixed: ``[n]`` bool, which rows are generated (default: all).
            teacher: teacher modality names, stored as given.
            teacher_choice: ``[n]`` index into ``teacher`` per row, stored as given.
            inter: the dense inter-modal weights that produced the plan, stored as given.
            intra: the dense intra-modal weights that produced the plan, stored as given.
        """
        _check_matrix("weights", weights)
        n, m = weights.shape
        if m == 0:
            fail("weights", "at least one column (partner)", weights, ShapeError)
        if not isinstance(renormalize, bool):
            fail("renormalize", "True or False", renormalize)
        top_k = check_int("top_k", top_k, minimum=1, allow_none=True)
        device = weights.device
        teacher_index = _own_positions(teacher_index, n, m, device)
        mixed = _check_mixed(mixed, n, device)
        plan = _layout(weights.float(), top_k=top_k, mixed=mixed, teacher_index=teacher_index,
                       renormalize=renormalize, teacher=tuple(teacher),
                       teacher_choice=teacher_choice, inter=inter, intra=intra)
        return cls(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)})


#: a plan gathers partners when k * _SPARSE_RATIO <= pool size, else it mixes with one dense product
_SPARSE_RATIO = 8


def _check_pool(samples: torch.Tensor) -> None:
    """Samples to mix: floating point (token ids cannot be mixed; finite values: checked while mixing)."""
    _check_samples(samples)


def _own_positions(teacher_index: Optional[torch.Tensor], n: int, m: int,
                   device: torch.device) -> Optional[torch.Tensor]:
    """Checked ``[n]`` pool positions of the rows' own samples (None: ``arange(n)``, needs ``n <= m``)."""
    if teacher_index is None:
        if n > m:
            fail("teacher_index", f"positions of the {n} rows' own samples (needed when n={n} > m={m})", None)
        return torch.arange(n, device=device)
    _check_long("teacher_index", teacher_index, 1)
    teacher_index = teacher_index.to(device)
    if teacher_index.shape[0] != n:
        fail("teacher_index", f"{n} entries, one per row", teacher_index, ShapeError)
    if n and (int(teacher_index.min()) < 0 or int(teacher_index.max()) >= m):
        fail("teacher_index", f"positions in [0, {m})", teacher_index)
    return teacher_index


def _check_mixed(mixed: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    if mixed is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if not isinstance(mixed, torch.Tensor) or mixed.dtype != torch.bool or mixed.shape != (n,):
        fail("mixed", f"a bool tensor of shape ({n},)", mixed)
    return mixed.to(device)


def _layout(values: torch.Tensor, *, top_k: Optional[int], mixed: torch.Tensor,
            teacher_index: Optional[torch.Tensor], renormalize: bool = False, teacher: Tuple[str, ...] = (),
            teacher_choice: Optional[torch.Tensor] = None, inter: Optional[torch.Tensor] = None,
            intra: Optional[torch.Tensor] = None, diagonal: Optional[bool] = None,
            candidates: Optional[torch.Tensor] = None) -> MixPlan:
    """The plan of final weights ``values`` ``[n, m]`` (float32, non-negative): its one layout.

    Keeps the ``top_k`` largest weights per row (all ``m`` when None), divided by their sum
    when ``renormalize``; a row with no weight becomes uniform over its kept partners. A row that is not mixed (``mixed`` False, or
    all its mass on its own sample ``teacher_index[r]``) is the original: its own position
    with weight 1, then zero weights. ``teacher_index`` None: the rows' own samples are not
    candidates, every row must be mixed. ``diagonal``: whether ``teacher_index`` is
    ``arange(n)``, when the caller knows (None: found out). ``candidates``: ``[n, top_k]``
    columns outside of which every entry of ``values`` is 0 (the top-k that
    :func:`functional._dca_weights_and_index` kept), or None.
    """
    n, m = values.shape
    device = values.device
    if top_k is not None:
        index = None
        if candidates is not None and candidates.shape == (n, min(top_k, m)):
            kept = values.gather(1, candidates)
            # positive and strictly decreasing: these are the row's top-k in topk's order (every other entry is
            # 0, no tie to break), so the second top-k over the [n, m] row is skipped; else it decides (rows
            # that are not mixed become the identity below: their values do not matter)
            if bool((((kept[:, :-1] > kept[:, 1:]).all(1) & (kept[:, -1] > 0)) | ~mixed.to(device)).all()):
                values, index = kept, candidates
        if index is None:
            values, index = values.topk(min(top_k, m), dim=1)
    else:
        index = torch.arange(m, device=device).expand(n, m)
    if renormalize:  # (all-zero rows become uniform)
        values = _normalize_rows(values)
    else:
        empty = values.sum(1, keepdim=True) <= 0
        if device.type != "cpu" or bool(empty.any()):  # (a CPU read-back is free: skip the no-op)
            values = torch.where(empty, torch.full_like(values, 1.0 / values.shape[1]), values)
    keep = mixed.to(device=device, dtype=torch.bool)
    if teacher_index is None:
        if not bool(keep.all()):
            fail("mixed", "all rows mixed when the rows' own samples are not candidates", mixed)
        # no own sample among the candidates: a placeholder position (every row is mixed, none copies it)
        own = torch.arange(n, device=device) if n <= m else torch.zeros(n, dtype=torch.long, device=device)
        plan = MixPlan._trusted(index=index.contiguous(), weights=values.contiguous(), teacher_index=own,
                                mixed=keep, teacher=teacher, teacher_choice=teacher_choice, inter=inter,
                                intra=intra)
        object.__setattr__(plan, "_pool", m)
        return plan
    own = teacher_index
    if diagonal is None:  # (whether row r's own sample is candidate r)
        diagonal = n <= m and bool(torch.equal(own, torch.arange(n, device=device)))
    if top_k is None and diagonal:
        self_mass = values.diagonal()  # (values * (index == own)).sum(1), exactly
    else:
        self_mass = (values * (index == own[:, None])).sum(1)
    keep = keep & (self_mass < (1.0 - 1e-6) * values.sum(1))  # only itself as partner: the original sample
    identity = torch.zeros_like(values)
    identity[:, 0] = 1.0
    index = torch.where(keep[:, None], index, own[:, None].expand_as(index))
    weights = torch.where(keep[:, None], values, identity)
    plan = MixPlan._trusted(index=index, weights=weights, teacher_index=own, mixed=keep, teacher=teacher,
                            teacher_choice=teacher_choice, inter=inter, intra=intra)
    object.__setattr__(plan, "_pool", m)
    return plan
