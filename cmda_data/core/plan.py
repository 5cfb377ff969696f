"""What was drawn for one batch: a :class:`MixPlan`, and :func:`make_plan` that draws it.

All randomness of CMDA (which rows are mixed, which teacher guides a row) is drawn in
:func:`make_plan` from an explicit ``torch.Generator``. Applying a plan is deterministic, and
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
from typing import Mapping, Optional, Tuple, Union

import torch

from ..exceptions import DeviceError, ShapeError, ValidationError
from . import functional as Fn
from ._kernels import _check_latents, _check_matrix, _check_resp, _normalize_rows
from ._validation import check_float_tensor, check_int, check_option, check_probability, check_rank, fail

__all__ = ["MixPlan", "apply", "make_plan"]

#: a plan reads partners sparsely when k * _SPARSE_RATIO <= pool size, else one dense matmul
_SPARSE_RATIO = 8


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
        return MixPlan._trusted(**moved)  # a checked plan stays valid on another device

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
        need = int(index.max()) + 1 if index.numel() else 0
        if tensor.shape[0] < need:
            fail(name, f"at least {need} samples along dim 0 (the plan indexes position "
                 f"{need - 1})", tensor, ShapeError)
        return index, weights

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mix ``tensor`` ``[m, *S]`` (any trailing shape) into ``[n, *S]``.

        Rows that are not mixed are copies of the original samples (exactly). A plan with no
        mixed row may be applied to any dtype (e.g. token ids); mixing needs floating point.
        """
        index, weights = self._on(tensor, "tensor")
        if not bool(self.mixed.any()):
            return tensor.index_select(0, index[:, 0])
        m = tensor.shape[0]
        if self.k * _SPARSE_RATIO <= m:
            return Fn.mix(weights, tensor, index=index)
        dense = torch.zeros(self.num_outputs, m, dtype=torch.float32, device=tensor.device)
        return Fn.mix(dense.scatter_add_(1, index, weights), tensor)

    def apply_targets(self, targets: torch.Tensor, num_classes: Optional[int] = None,
                      label_smoothing: float = 0.0) -> torch.Tensor:
        """Soft labels ``[n, C]`` float32 for the mixed rows (see :func:`functional.mix_targets`)."""
        index, weights = self._on(targets, "targets")
        return Fn.mix_targets(weights, targets, num_classes, label_smoothing, index=index)

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
        device = weights.device
        if teacher_index is None:
            if n > m:
                fail("teacher_index", f"positions of the {n} rows' own samples (needed when "
                     f"n={n} > m={m})", None)
            teacher_index = torch.arange(n, device=device)
        else:
            _check_long("teacher_index", teacher_index, 1)
            teacher_index = teacher_index.to(device)
            if teacher_index.shape[0] != n:
                fail("teacher_index", f"{n} entries to match weights", teacher_index, ShapeError)
            if n and (int(teacher_index.min()) < 0 or int(teacher_index.max()) >= m):
                fail("teacher_index", f"positions in [0, {m})", teacher_index)
        if mixed is None:
            mixed = torch.ones(n, dtype=torch.bool, device=device)
        elif not isinstance(mixed, torch.Tensor) or mixed.dtype != torch.bool or mixed.shape != (n,):
            fail("mixed", f"a bool tensor of shape ({n},)", mixed)
        mixed = mixed.to(device)
        if not isinstance(renormalize, bool):
            fail("renormalize", "True or False", renormalize)
        if top_k is not None:
            top_k = min(check_int("top_k", top_k, minimum=1), m)
            if renormalize:
                index, values = Fn.topk_sparse(weights, top_k)
            else:
                values, index = weights.topk(top_k, dim=1)
        else:
            index = torch.arange(m, device=device).expand(n, m).clone()
            values = weights
        values = values.float()
        if renormalize:  # all-zero rows become uniform over the kept partners (never NaN)
            values = _normalize_rows(values)
        else:
            empty = values.sum(1, keepdim=True) <= 0
            values = torch.where(empty, torch.full_like(values, 1.0 / values.shape[1]), values)
        still = ~mixed
        index = torch.where(still[:, None], teacher_index[:, None].expand_as(index), index)
        first = torch.zeros_like(values)
        first[:, 0] = 1
        values = torch.where(still[:, None], first, values)
        return cls(index=index.contiguous(), weights=values.contiguous(),
                   teacher_index=teacher_index, mixed=mixed, teacher=tuple(teacher),
                   teacher_choice=teacher_choice, inter=inter, intra=intra)


def apply(plan: MixPlan, tensor: torch.Tensor) -> torch.Tensor:
    """Apply ``plan`` to ``tensor`` (same as ``plan.apply(tensor)``).

    Examples:
        >>> apply(MixPlan.identity(2), torch.tensor([[1.0], [2.0], [3.0]]))
        tensor([[1.],
                [2.]])
    """
    if not isinstance(plan, MixPlan):
        fail("plan", "a MixPlan", plan)
    return plan.apply(tensor)


def _draw_generator(generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is None:  # a private, non-deterministically seeded generator (never global)
        fresh = torch.Generator()
        fresh.seed()
        return fresh
    if not isinstance(generator, torch.Generator):
        fail("generator", "a torch.Generator or None", generator)
    return generator


def make_plan(teacher_z: Union[torch.Tensor, Mapping[str, torch.Tensor]], student_z: torch.Tensor, *,
              resp_rows: Optional[torch.Tensor] = None, resp_cols: Optional[torch.Tensor] = None,
              teacher_index: Optional[torch.Tensor] = None, similarity: str = "abs_cosine",
              normalize: str = "row", temperature: Optional[float] = None,
              self_weight: Optional[float] = None, intra: Optional[str] = "soft",
              top_k: Optional[int] = None, exclude_self: bool = False, renormalize: bool = True,
              p: float = 1.0, generator: Optional[torch.Generator] = None) -> MixPlan:
    """Draw a :class:`MixPlan`: the one place where a plan's randomness is drawn.

    Builds the inter-modal weights (Eq. 10) of every teacher, the intra-modal weights
    (Eq. 11) when responsibilities are given, combines them (:func:`functional.dca_weights`)
    and draws, from ``generator`` only, which rows are mixed (each with probability ``p``)
    and, with several teachers, which teacher guides each row (uniformly). The draw order is
    fixed: first ``rand(n)`` for ``mixed``, then ``randint`` for the teacher choice.

    Args:
        teacher_z: teacher latents ``[n, d]``, or a mapping ``name -> [n, d]`` of several.
        student_z: student latents ``[m, d]`` (the pool that is mixed).
        resp_rows: GMM responsibilities ``[n, M]`` of the rows. No intra weights without them.
        resp_cols: GMM responsibilities ``[m, M]`` of the partners (default ``resp_rows``).
        teacher_index: ``[n]`` pool position of each row's own sample (default ``arange(n)``).
        similarity: see :func:`functional.inter_modal_weights`.
        normalize: see :func:`functional.inter_modal_weights`.
        temperature: see :func:`functional.inter_modal_weights`.
        self_weight: see :func:`functional.inter_modal_weights`.
        intra: ``"soft"`` (Eq. 11), ``"hard"`` (code's mask) or None (ignore responsibilities).
        top_k: see :func:`functional.dca_weights`.
        exclude_self: see :func:`functional.dca_weights`.
        renormalize: see :func:`functional.dca_weights`.
        p: probability that a row is mixed (the others are the original samples).
        generator: the ``torch.Generator`` to draw from. None uses a fresh, randomly seeded
            private generator (the global RNG is never touched); pass one to reproduce plans.

    Examples:
        >>> t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> plan = make_plan(t, t, generator=torch.Generator().manual_seed(0))
        >>> plan.dense(2)
        tensor([[1., 0.],
                [0., 1.]])
    """
    p = check_probability("p", p)
    check_int("top_k", top_k, minimum=1, allow_none=True)  # checked before anything is drawn
    generator = _draw_generator(generator)
    if intra is not None:
        check_option("intra", intra, Fn.INTRA_MODES)
    if isinstance(teacher_z, Mapping):
        if not teacher_z:
            fail("teacher_z", "at least one teacher modality", teacher_z)
        names = tuple(teacher_z)
        if not all(isinstance(name, str) for name in names):
            fail("teacher_z", "modality names (str) as keys", names)
        latents = [teacher_z[name] for name in names]
    elif isinstance(teacher_z, torch.Tensor):
        names, latents = (), [teacher_z]
    else:
        fail("teacher_z", "a tensor [n, d] or a mapping name -> tensor [n, d]", teacher_z)
    labels = [f"teacher_z[{name!r}]" for name in names] if names else ["teacher_z"]
    for label, latent in zip(labels, latents):
        _check_latents(label, latent)
    _check_latents("student_z", student_z)
    device = student_z.device
    n = latents[0].shape[0]
    if teacher_index is not None:
        _check_long("teacher_index", teacher_index, 1)
        teacher_index = teacher_index.to(device)
    if teacher_index is not None and (self_weight is not None or exclude_self):
        if not torch.equal(teacher_index.cpu(), torch.arange(teacher_index.numel())):
            fail("teacher_index", "None or arange(n) when self_weight or exclude_self is used "
                 "(they treat column r as row r's own sample)", teacher_index)

    per_teacher = []
    for label, latent in zip(labels, latents):
        if latent.shape[0] != n:
            fail(label, f"{n} rows like the first teacher", latent, ShapeError)
        try:
            per_teacher.append(Fn.inter_modal_weights(
                latent.to(device), student_z, similarity=similarity, normalize=normalize,
                temperature=temperature, self_weight=self_weight).float())
        except (ShapeError, ValidationError) as error:
            raise type(error)(f"{error} (teacher {label})") from None

    m = student_z.shape[0]
    intra_w = None
    if resp_rows is not None and intra is not None:
        _check_resp("resp_rows", resp_rows)
        if resp_rows.shape[0] != n:
            fail("resp_rows", f"{n} rows (one per teacher row)", resp_rows, ShapeError)
        if resp_cols is None and n != m:
            fail("resp_cols", f"responsibilities of the {m} student samples (resp_rows has "
                 f"{n} rows)", None)
        if resp_cols is not None:
            _check_resp("resp_cols", resp_cols)
            if resp_cols.shape[0] != m:
                fail("resp_cols", f"{m} rows (one per student sample)", resp_cols, ShapeError)
        intra_w = Fn.intra_modal_weights(resp_rows.to(device),
                                         None if resp_cols is None else resp_cols.to(device),
                                         mode=intra).float()

    # ---- every random draw of the plan, from `generator` only, in a fixed order
    mixed = torch.rand(n, generator=generator, device=generator.device) < p
    if len(latents) > 1:
        choice = torch.randint(len(latents), (n,), generator=generator, device=generator.device)
    else:
        choice = torch.zeros(n, dtype=torch.int64)
    mixed, choice = mixed.to(device), choice.to(device)

    if len(per_teacher) == 1:
        inter = per_teacher[0]
    else:
        inter = torch.stack(per_teacher).gather(
            0, choice[None, :, None].expand(1, n, m)).squeeze(0)
    dense = Fn.dca_weights(inter, intra_w, top_k=top_k, exclude_self=exclude_self,
                           renormalize=renormalize)
    return MixPlan.from_dense(dense, top_k=top_k, renormalize=False, teacher_index=teacher_index,
                              mixed=mixed, teacher=names,
                              teacher_choice=choice if names else None, inter=inter, intra=intra_w)
