"""The one place where the entry points turn draws + latents into a MixPlan (private).

:class:`~cmda_data.CrossModalAugmentedDataset`, :class:`~cmda_data.CMDACollate` and
:class:`~cmda_data.CMDAugment` all come here, so the same seed gives the same mixed
samples whenever the candidate pool is the same:

1. :func:`row_draws`: per row, from the row's key (a fixed 64-bit hash of
   ``(seed, epoch, rank, dataset index)``, the seed of ``_seeding.row_generator``), whether
   it is mixed (Bernoulli ``p``) and which teacher guides it (uniform over the teachers);
   vectorised over the rows of a batch, identical for one row in the dataset.
2. :func:`build_plan`: :func:`cmda_data.core.plan.make_plan` (with ``p=1``: the draws above are
   applied afterwards) builds the Eq. 10/11 weights, then rows that are not mixed become
   the identity (own position, weight 1, zero-weight padding) and rows whose weights keep
   all mass on the sample itself are marked as not mixed.
3. :func:`bank_plan`: the same with latents and responsibilities looked up in a bank. For a
   square pool (the rows are the candidates, as in :class:`~cmda_data.CMDACollate`) it takes
   a trusted path (:func:`_bank_square_plan`): the bank's tensors were checked when the bank was
   built, so the same functional math runs without re-checking them, and the plan is built
   directly in its final layout. :func:`square_plan` is that path for latents the library did
   not build (``CMDAugment``'s aligner mode): it checks them, with one read-back, first.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..core import functional as Fn
from ..core._kernels import _check_latents, _check_resp, _check_resp_shape, _check_resp_stats, _resp_stats
from ..core._seeding import draw_rows
from ..core._validation import (
    check_float_tensor,
    check_int,
    check_option,
    check_positive_float,
    check_probability,
    check_rank,
    fail,
)
from ..exceptions import DeviceError, ShapeError

__all__ = ["PlanOptions", "bank_plan", "build_plan", "mix_info", "row_draws"]

INTRA = ("soft", "hard", None)
SIMILARITY = ("abs_cosine", "cosine")
NORMALIZE = ("row", "legacy_broadcast", "none")


@dataclass(frozen=True)
class PlanOptions:
    """Validated plan settings shared by the entry points (picklable)."""

    student: str
    teachers: Tuple[str, ...]
    p: float = 1.0
    intra: Optional[str] = "soft"
    top_k: Optional[int] = None
    similarity: str = "abs_cosine"
    normalize: str = "row"
    temperature: Optional[float] = None
    self_weight: Optional[float] = None
    exclude_self: bool = False
    renormalize: bool = True
    seed: int = 0
    rank: int = 0

    @classmethod
    def create(cls, *, student: str, teachers: Union[str, Sequence[str]], bank: Any = None,
               **options: Any) -> "PlanOptions":
        """Validate ``options``; with a ``bank``, also check the modalities and the GMM."""
        teachers = (teachers,) if isinstance(teachers, str) else tuple(teachers)
        if not teachers:
            fail("teachers", "at least one teacher modality", teachers)
        if options.get("rank", 0) is None:  # None: this process's torch.distributed rank
            from ..distributed import get_rank

            options["rank"] = get_rank()
        opts = cls(student=student, teachers=teachers, **options)
        check_probability("p", opts.p)
        check_option("intra", opts.intra, INTRA)
        check_int("top_k", opts.top_k, minimum=1, allow_none=True)
        check_option("similarity", opts.similarity, SIMILARITY)
        check_option("normalize", opts.normalize, NORMALIZE)
        check_positive_float("temperature", opts.temperature, allow_none=True)
        check_positive_float("self_weight", opts.self_weight, allow_zero=True, allow_none=True)
        for name in ("exclude_self", "renormalize"):
            if not isinstance(getattr(opts, name), bool):
                fail(name, "True or False", getattr(opts, name))
        check_int("seed", opts.seed)
        check_int("rank", opts.rank, minimum=0)
        if bank is not None:
            if opts.student != bank.student and opts.student not in bank.modalities:
                fail("student", "a modality of the bank (" + ", ".join(map(repr, bank.modalities)) + ")",
                     opts.student)
            for teacher in teachers:
                if teacher not in bank.modalities or teacher == opts.student:
                    fail("teachers", "modalities of the bank other than the student ("
                         + ", ".join(map(repr, bank.modalities)) + ")", teacher)
            if opts.intra is not None and bank.responsibilities is None:
                fail("intra", "None for a bank without a GMM (or build the bank with fit_gmm=True)",
                     opts.intra)
        return replace(opts, p=float(opts.p), top_k=None if opts.top_k is None else int(opts.top_k),
                       seed=int(opts.seed), rank=int(opts.rank))


def row_draws(indices: torch.Tensor, opts: PlanOptions, epoch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mixed [n] bool, teacher_choice [n] long)`` on the CPU, from each row's key."""
    return draw_rows(indices.reshape(-1).long().cpu().numpy(), seed=opts.seed, epoch=epoch, rank=opts.rank,
                     p=opts.p, n_teachers=len(opts.teachers))


def build_plan(teacher_z: Sequence[torch.Tensor], student_z: torch.Tensor, opts: PlanOptions, *,
               mixed: torch.Tensor, teacher_choice: torch.Tensor,
               resp_rows: Optional[torch.Tensor] = None, resp_cols: Optional[torch.Tensor] = None,
               teacher_index: Optional[torch.Tensor] = None, exclude_self: Optional[bool] = None):
    """A MixPlan for ``n`` teacher rows (one latent per teacher modality) over ``m`` candidates.

    Args:
        teacher_z: one ``[n, d]`` tensor per teacher modality; row ``r`` uses teacher
            ``teacher_choice[r]``.
        student_z: ``[m, d]`` latents of the candidates.
        opts: the settings.
        mixed: ``[n]`` bool draws; rows drawn False become the identity plan.
        teacher_choice: ``[n]`` long draws.
        resp_rows, resp_cols: GMM responsibilities of the rows / candidates (``intra``).
        teacher_index: ``[n]`` position of each row's own sample in the candidates, or None
            when the own sample is not a candidate (then every row must be mixed).
        exclude_self: overrides ``opts.exclude_self`` (square pools only).
    """
    from ..core.plan import MixPlan, make_plan

    device = student_z.device
    n = teacher_z[0].shape[0]
    choice = teacher_choice.to(device)
    if len(teacher_z) == 1:
        rows_z = teacher_z[0]
    else:
        rows_z = torch.stack(list(teacher_z))[choice, torch.arange(n, device=device)]
    intra = opts.intra if resp_rows is not None else None
    base = make_plan(rows_z, student_z, resp_rows=resp_rows if intra else None,
                     resp_cols=resp_cols if intra else None,
                     teacher_index=teacher_index, similarity=opts.similarity, normalize=opts.normalize,
                     temperature=opts.temperature, self_weight=opts.self_weight, intra=intra, top_k=opts.top_k,
                     exclude_self=opts.exclude_self if exclude_self is None else exclude_self,
                     renormalize=opts.renormalize, p=1.0, generator=torch.Generator().manual_seed(0))
    index, weights = base.index, base.weights.float()
    keep = mixed.to(device=device, dtype=torch.bool)
    if teacher_index is not None:
        own = teacher_index.to(device=device, dtype=torch.long)
        self_mass = (weights * (index == own[:, None])).sum(1)
        keep = keep & (self_mass < 1.0 - 1e-6)  # only itself as partner: the original sample
        identity_weights = torch.zeros_like(weights)
        identity_weights[:, 0] = 1.0
        index = torch.where(keep[:, None], index, own[:, None].expand_as(index))
        weights = torch.where(keep[:, None], weights, identity_weights)
    elif not bool(keep.all()):
        fail("mixed", "all rows mixed when the rows' own samples are not candidates", mixed)
    else:
        own = base.teacher_index
    # valid by construction: `base` was checked by make_plan, the rest are the library's own draws
    return MixPlan._trusted(index=index, weights=weights, teacher_index=own, mixed=keep,
                            teacher=tuple(opts.teachers), teacher_choice=choice, inter=base.inter,
                            intra=base.intra)


def bank_plan(bank: Any, rows: torch.Tensor, pool: torch.Tensor, opts: PlanOptions, epoch: int, *,
              mixed: Optional[torch.Tensor] = None, teacher_choice: Optional[torch.Tensor] = None,
              teacher_index: Optional[torch.Tensor] = None, square: Optional[bool] = None):
    """:func:`build_plan` with latents and responsibilities of dataset indices looked up in ``bank``.

    ``square`` (default: ``rows`` and ``pool`` are equal) means row ``r``'s own sample is
    candidate ``r``: ``teacher_index`` is then ``arange(n)`` and ``exclude_self`` applies.
    """
    same = pool is rows
    rows = torch.as_tensor(rows).reshape(-1).long().cpu()
    pool = rows if same else torch.as_tensor(pool).reshape(-1).long().cpu()
    identical = same or (rows.shape == pool.shape and bool(torch.equal(rows, pool)))
    if square is None:
        square = identical
    if mixed is None or teacher_choice is None:
        mixed, teacher_choice = row_draws(rows, opts, epoch)
    if square and identical:
        return _bank_square_plan(bank, rows, opts, mixed=mixed, teacher_choice=teacher_choice)
    row_pos, pool_pos = bank.positions(rows), bank.positions(pool)
    teacher_z = [bank.embeddings[t][row_pos] for t in opts.teachers]
    student_z = bank.embeddings[opts.student][pool_pos]
    resp = bank.responsibilities
    resp_rows = resp_cols = None
    if opts.intra is not None:
        if resp is None:
            fail("intra", "None for a bank without a GMM (or build the bank with fit_gmm=True)", opts.intra)
        resp_rows, resp_cols = resp[row_pos], resp[pool_pos]
    if square:
        teacher_index = torch.arange(len(rows), device=bank.device)
    return build_plan(teacher_z, student_z, opts, mixed=mixed, teacher_choice=teacher_choice,
                      resp_rows=resp_rows, resp_cols=resp_cols,
                      teacher_index=None if teacher_index is None else teacher_index.to(bank.device),
                      exclude_self=opts.exclude_self if square else False)


#: id(responsibility table) -> (weak reference, tensor version) of tables whose every row passed _check_resp
_VALID_RESP: Dict[int, Tuple[Any, int]] = {}


def _all_rows_valid(resp: torch.Tensor) -> bool:
    """Whether every row of the bank's responsibilities passes ``_check_resp`` (checked once per table).

    A table with an invalid row returns False, so each batch's rows are checked (and a batch
    that uses such a row raises, as before). In-place changes of the table bump its version.
    """
    from ..exceptions import CMDAError

    entry = _VALID_RESP.get(id(resp))
    if entry is not None and entry[0]() is resp and entry[1] == resp._version:
        return True
    version = resp._version
    try:
        _check_resp("responsibilities", resp)
    except (CMDAError, ValueError):
        return False
    for key in [key for key, (ref, _) in _VALID_RESP.items() if ref() is None]:
        del _VALID_RESP[key]
    _VALID_RESP[id(resp)] = (weakref.ref(resp), version)
    return True


def _bank_square_plan(bank: Any, rows: torch.Tensor, opts: PlanOptions, *, mixed: torch.Tensor,
                      teacher_choice: torch.Tensor):
    """:func:`bank_plan` for a square pool (candidate ``r`` is row ``r``'s own sample), trusted path.

    The same math as :func:`build_plan` + :func:`cmda_data.core.plan.make_plan` (the private
    functional kernels they call, in the same order, so the plan is bit-identical), without
    re-checking what the library itself built and checked: the bank's embeddings (finite
    float32, checked when the bank was built), the options (:meth:`PlanOptions.create`) and
    the intermediate weight matrices. The dataset indices are still checked
    (``bank.positions``) and so are the looked-up responsibilities (rows of a GMM posterior).
    One bank lookup serves rows and candidates, and the plan is written directly in its
    final layout (rows that are not mixed: own position, weight 1, zero-weight padding).
    """
    device = bank.device
    pos = bank.positions(rows)
    tables = bank.embeddings
    resp_rows = None
    if opts.intra is not None:
        resp = bank.responsibilities
        if resp is None:
            fail("intra", "None for a bank without a GMM (or build the bank with fit_gmm=True)", opts.intra)
        resp_rows = resp.index_select(0, pos)
        if not _all_rows_valid(resp):  # only then can the rows of this batch be invalid
            _check_resp("resp_rows", resp_rows)
    return _square_core([tables[t].index_select(0, pos) for t in opts.teachers],
                        tables[opts.student].index_select(0, pos), resp_rows, opts, mixed=mixed,
                        teacher_choice=teacher_choice.to(device))


def square_plan(teacher_z: Sequence[torch.Tensor], student_z: torch.Tensor, resp: Optional[torch.Tensor],
                opts: PlanOptions, *, mixed: torch.Tensor, teacher_choice: torch.Tensor):
    """A plan over a batch that is its own pool (row ``r``'s own sample is candidate ``r``).

    What :func:`build_plan` gives for ``teacher_index = arange(n)`` and ``resp_cols = resp``,
    bit for bit, for latents the library did not build (an aligner's output, a GMM's
    posteriors): they are checked with every reduction read back in ONE transfer (on a GPU
    each read is a synchronisation), then the trusted kernels run.
    """
    _check_plan_inputs(teacher_z, student_z, resp if opts.intra is not None else None)
    device = student_z.device
    return _square_core(list(teacher_z), student_z, resp if opts.intra is not None else None, opts, mixed=mixed,
                        teacher_choice=teacher_choice.to(device))


def _check_plan_inputs(teacher_z: Sequence[torch.Tensor], student_z: torch.Tensor,
                       resp: Optional[torch.Tensor]) -> None:
    """Finite latents and valid responsibilities (``_check_resp``'s reductions), read back in one transfer."""
    n = student_z.shape[0]
    names = [f"teacher_z[{i}]" if len(teacher_z) > 1 else "teacher_z" for i in range(len(teacher_z))]
    for name, z in zip(names, teacher_z):
        check_float_tensor(name, z, finite=False)
        check_rank(name, z, 2)
        if z.shape[0] != n:
            fail(name, f"[{n}, d] latents, one row per sample like student_z", z, ShapeError)
        if z.device != student_z.device:
            fail(name, f"a tensor on {student_z.device} like student_z", z, DeviceError)
    check_float_tensor("student_z", student_z, finite=False)
    check_rank("student_z", student_z, 2)
    latents = (*teacher_z, student_z)
    parts = [torch.stack([z.sum(dtype=torch.float64 if z.dtype == torch.float64 else torch.float32).double()
                          for z in latents])]
    if resp is not None:
        _check_resp_shape("resp_rows", resp)
        if resp.shape[0] != n:
            fail("resp_rows", f"[{n}, M] responsibilities of the batch rows", resp, ShapeError)
        if resp.numel():
            parts.append(_resp_stats(resp).to(student_z.device))
    values = torch.cat(parts).tolist()  # the one read-back
    for name, z, total in zip([*names, "student_z"], latents, values):
        if not math.isfinite(total):
            _check_latents(name, z)  # a finite sum can overflow: the element-wise check words the error
    if len(values) > len(latents):
        _check_resp_stats("resp_rows", resp, *values[len(latents):])


def _square_core(teacher_z: Sequence[torch.Tensor], student_z: torch.Tensor, resp_rows: Optional[torch.Tensor],
                 opts: PlanOptions, *, mixed: torch.Tensor, teacher_choice: torch.Tensor):
    """The trusted math of a square plan (checked inputs; see :func:`_bank_square_plan`)."""
    device = student_z.device
    n = int(student_z.shape[0])
    choice = teacher_choice
    if len(teacher_z) == 1:
        rows_z = teacher_z[0]
    else:
        rows_z = torch.stack(list(teacher_z))[choice, torch.arange(n, device=device)]
    intra_w = None
    if opts.intra is not None and resp_rows is not None:
        intra_w = Fn._intra_modal_weights(resp_rows, None, opts.intra).float()
    temperature = None if opts.temperature is None else float(opts.temperature)
    self_weight = None if opts.self_weight is None else float(opts.self_weight)
    inter = Fn._inter_modal_weights(rows_z, student_z, opts.similarity, opts.normalize, temperature,
                                    self_weight).float()
    dense = Fn._dca_weights(inter, intra_w, opts.top_k, opts.exclude_self, opts.renormalize)
    own = torch.arange(n, device=device)
    if opts.top_k is not None:  # MixPlan.from_dense(top_k=..., renormalize=False)
        values, index = dense.topk(min(opts.top_k, n), dim=1)
    else:
        values, index = dense, own.expand(n, n)
    values = values.float()
    empty = values.sum(1, keepdim=True) <= 0
    if device.type != "cpu" or bool(empty.any()):  # (never for dca_weights' rows; a CPU sync is free)
        values = torch.where(empty, torch.full_like(values, 1.0 / values.shape[1]), values)
    if opts.top_k is None:  # (values * (index == own)).sum(1): the diagonal, exactly
        self_mass = values.diagonal()
    else:
        self_mass = (values * (index == own[:, None])).sum(1)
    keep = mixed.to(device=device, dtype=torch.bool) & (self_mass < 1.0 - 1e-6)
    identity_weights = torch.zeros_like(values)
    identity_weights[:, 0] = 1.0
    keep_rows = keep[:, None]
    index = torch.where(keep_rows, index, own[:, None].expand_as(index))
    weights = torch.where(keep_rows, values, identity_weights)
    from ..core.plan import MixPlan

    return MixPlan._trusted(index=index, weights=weights, teacher_index=own, mixed=keep,
                            teacher=tuple(opts.teachers), teacher_choice=choice, inter=inter, intra=intra_w)


def mix_info(plan: Any, index: Optional[torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The ``mix_info`` record of a batch: dataset indices of the rows and of their partners.

    Keys: ``"index"`` [B] (the row's own dataset index), ``"partners"`` [B, k] (dataset
    indices), ``"weights"`` [B, k] float32 (rows sum to 1), ``"mixed"`` [B] bool and
    ``"teacher"`` [B] long (position in ``teachers`` of the guiding teacher). Without
    dataset indices, ``index`` and ``partners`` hold positions in the batch.
    """
    own = plan.teacher_index
    if index is None:
        return {"index": own, "partners": plan.index, "weights": plan.weights, "mixed": plan.mixed,
                "teacher": plan.teacher_choice}
    index = index.to(plan.index.device)
    return {"index": index[own], "partners": index[plan.index], "weights": plan.weights, "mixed": plan.mixed,
            "teacher": plan.teacher_choice}
