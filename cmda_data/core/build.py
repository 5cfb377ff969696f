"""The one builder of plans (:func:`build_plan`) and :func:`make_plan`, which draws a plan from latents.

Every plan of the library comes from :func:`build_plan`: :func:`make_plan` (draws from a
``torch.Generator``), :meth:`EmbeddingBank.plan <cmda_data.bank.EmbeddingBank.plan>` and the four
entry points (per-row draws from ``(seed, epoch, rank, index)``). The layout of the weights
(top-k, identity rows) is :meth:`MixPlan.from_dense <cmda_data.core.plan.MixPlan.from_dense>`'s.

Examples:
    >>> t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    >>> plan = build_plan([t], t, mixed=torch.tensor([True, False]), teacher_index=torch.arange(2), intra=None)
    >>> plan.mixed.tolist(), plan.index.tolist(), plan.weights.tolist()
    ([True, False], [[0, 1], [1, 1]], [[0.625, 0.375], [1.0, 0.0]])
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..exceptions import DeviceError, ShapeError
from . import functional as Fn
from ._kernels import _check_latents, _check_resp_shape, _check_resp_stats, _resp_stats
from ._validation import (
    check_float_tensor,
    check_int,
    check_option,
    check_probability,
    check_rank,
    check_temperature,
    check_tensor_data,
    fail,
)
from .plan import MixPlan, _check_long, _check_mixed, _layout, _own_positions

__all__ = ["build_plan", "make_plan"]


def _draw_generator(generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is None:  # a private, non-deterministically seeded generator (never global)
        fresh = torch.Generator()
        fresh.seed()
        return fresh
    if not isinstance(generator, torch.Generator):
        fail("generator", "a torch.Generator or None", generator)
    return generator


def _check_plan_inputs(teacher_z: Sequence[torch.Tensor], student_z: torch.Tensor,
                       resp_rows: Optional[torch.Tensor], resp_cols: Optional[torch.Tensor],
                       teacher_choice: Optional[torch.Tensor], teacher_index: Optional[torch.Tensor]) -> Optional[bool]:
    """Every check of a plan's inputs, with every reduction read back in ONE transfer (a GPU sync).

    Finite latents, valid responsibilities, draws in range. Returns whether ``teacher_index``
    is ``arange(n)`` (None without one; False for one pool per row).
    """
    n = teacher_z[0].shape[0] if teacher_z else 0
    check_float_tensor("student_z", student_z, finite=False)
    per_row = student_z.ndim == 3  # one pool per row
    if not per_row:
        check_rank("student_z", student_z, 2)
    elif student_z.shape[0] != n:
        fail("student_z", f"[{n}, m, d] latents, one pool per teacher row", student_z, ShapeError)
    m = student_z.shape[-2]
    names = [f"teacher_z[{i}]" if len(teacher_z) > 1 else "teacher_z" for i in range(len(teacher_z))]
    device = student_z.device
    for name, z in zip(names, teacher_z):
        check_float_tensor(name, z, finite=False)
        check_rank(name, z, 2)
        if z.shape[0] != n:
            fail(name, f"[{n}, d] latents, one row per teacher row like the first teacher", z, ShapeError)
        if z.shape[1] != student_z.shape[-1]:
            fail(name, f"{student_z.shape[-1]} columns like student_z", z, ShapeError)
        if z.device != device:
            fail(name, f"a tensor on {device} like student_z", z, DeviceError)
    latents = (*teacher_z, student_z)
    parts = [torch.stack([z.sum(dtype=torch.float64 if z.dtype == torch.float64 else torch.float32).double()
                          for z in latents])]
    resps = [(name, r, rows) for name, r, rows in (("resp_rows", resp_rows, n), ("resp_cols", resp_cols, m))
             if r is not None]
    for at, (name, resp, rows) in enumerate(resps):
        if name == "resp_cols" and per_row:  # [n, m, M]: checked as its n * m rows
            if resp.ndim != 3 or resp.shape[:2] != student_z.shape[:2]:
                fail(name, f"[{n}, {m}, M] responsibilities, one per candidate of each row's pool", resp,
                     ShapeError)
            resps[at] = (name, resp.reshape(n * m, resp.shape[2]), n * m)
            resp, rows = resps[at][1], n * m
        _check_resp_shape(name, resp)
        if resp.shape[0] != rows:
            fail(name, f"[{rows}, M] responsibilities, one row per " + ("teacher row" if name == "resp_rows"
                 else "candidate"), resp, ShapeError)
        parts.append(_resp_stats(resp).to(device) if resp.numel() else torch.zeros(3, dtype=torch.float64,
                                                                                        device=device))
    draws = [(name, value) for name, value in (("teacher_choice", teacher_choice), ("teacher_index", teacher_index))
             if value is not None]
    for name, value in draws:
        _check_long(name, value, 1)
        if value.shape[0] != n:
            fail(name, f"{n} entries, one per row", value, ShapeError)
        if value.device != device:
            fail(name, f"a tensor on {device} like student_z", value, DeviceError)
        if n:
            parts.append(torch.stack(torch.aminmax(value)).double())
    if teacher_index is not None and n:
        is_arange = ((teacher_index == torch.arange(n, device=device)).all() if n <= m and not per_row
                     else torch.tensor(False))
        parts.append(is_arange.double().reshape(1).to(device))
    values = torch.cat(parts).tolist()  # the one read-back
    for name, z, total in zip([*names, "student_z"], latents, values):
        if not math.isfinite(total):
            _check_latents(name, z)  # a finite sum can overflow: the element-wise check words the error
    at = len(latents)
    for name, resp, _ in resps:
        if resp.numel():
            _check_resp_stats(name, resp, *values[at:at + 3])
        at += 3
    for name, value in draws:
        if n:
            low, high = values[at], values[at + 1]
            bound = len(teacher_z) if name == "teacher_choice" else m
            if low < 0 or high >= bound:
                fail(name, f"positions in [0, {bound})" if name == "teacher_index" else f"values in [0, {bound})",
                     f"values from {int(low)} to {int(high)}", raw=True)
            at += 2
    if teacher_index is None:
        return None
    return bool(values[at]) if n else True


def build_plan(teacher_z: Sequence[torch.Tensor], student_z: torch.Tensor, *, mixed: torch.Tensor,
               teacher_choice: Optional[torch.Tensor] = None, resp_rows: Optional[torch.Tensor] = None,
               resp_cols: Optional[torch.Tensor] = None, teacher_index: Optional[torch.Tensor] = None,
               teacher: Tuple[str, ...] = (), similarity: str = "abs_cosine", normalize: str = "row",
               temperature: Optional[float] = None, self_weight: Optional[float] = None,
               intra: Optional[str] = "soft", top_k: Optional[int] = None, exclude_self: bool = False,
               renormalize: bool = True, validate: bool = True,
               pool_index: Optional[torch.Tensor] = None) -> MixPlan:
    """The one builder of plans: Eq. 10/11 weights of ``n`` rows over ``m`` candidates, and the draws.

    :func:`make_plan` and every entry point come here. Row ``r`` is guided by teacher
    ``teacher_choice[r]`` (its latent is ``teacher_z[teacher_choice[r]][r]``); its weights
    over the candidates ``student_z`` are Eq. 10 (:func:`functional.inter_modal_weights`)
    times Eq. 11 (:func:`functional.intra_modal_weights`, when ``resp_rows`` is given and
    ``intra`` is not None), combined by :func:`functional.dca_weights`; then the layout
    (top-k, identity rows) of :meth:`MixPlan.from_dense`.

    The candidates are shared by all rows (``student_z`` ``[m, d]``), or each row has its
    own pool (``student_z`` ``[n, m, d]``, e.g. the dataset's per-item pools): row ``r``'s
    scores are then computed against ``student_z[r]`` alone, and the same row-wise weight
    and layout code follows; the plan's ``index`` and ``teacher_index`` are positions in each
    row's own pool.

    Args:
        teacher_z: one ``[n, d]`` tensor per teacher.
        student_z: ``[m, d]`` latents of the candidates, or ``[n, m, d]``: one pool per row.
        mixed: ``[n]`` bool draws: rows drawn False are the original samples.
        teacher_choice: ``[n]`` int64 index into ``teacher_z`` (default: all 0).
        resp_rows: ``[n, M]`` GMM responsibilities of the rows (no intra weights without them).
        resp_cols: ``[m, M]`` responsibilities of the candidates (default ``resp_rows``, needs ``n == m``);
            ``[n, m, M]`` with one pool per row (then required).
        teacher_index: ``[n]`` position of each row's own sample among the candidates (it is
            the one ``self_weight`` and ``exclude_self`` act on, and rows that are not mixed
            copy it); None when the own samples are not candidates (every row must be mixed).
        teacher: the teacher names, stored in the plan.
        similarity: see :func:`functional.inter_modal_weights`.
        normalize: see :func:`functional.inter_modal_weights`.
        temperature: see :func:`functional.inter_modal_weights`.
        self_weight: see :func:`functional.inter_modal_weights` (on each row's own sample).
        intra: ``"soft"``, ``"hard"`` or None (see :func:`functional.intra_modal_weights`).
        top_k: see :func:`functional.dca_weights`.
        exclude_self: see :func:`functional.dca_weights` (each row's own sample).
        renormalize: see :func:`functional.dca_weights`.
        validate: check every input (one read-back for all value checks). False only for
            inputs the library built and checked itself (a bank's rows, its own draws).
        pool_index: ``[n, m]`` positions into ``student_z`` ``[u, d]``: one pool per row given as
            ``student_z[pool_index]`` without building it (pools that share candidates: each
            distinct latent is normalised once; the same values).
    """
    n = int(teacher_z[0].shape[0]) if len(teacher_z) else 0
    diagonal: Optional[bool] = None
    if pool_index is not None and validate:  # checked as the [n, m, d] pools it stands for
        student_z, pool_index = student_z[pool_index], None
    if validate:
        if not isinstance(teacher_z, (list, tuple)) or not teacher_z:
            fail("teacher_z", "one or more [n, d] teacher latents", teacher_z)
        check_option("similarity", similarity, Fn.SIMILARITIES)
        check_option("normalize", normalize, Fn.NORMALIZATIONS)
        if intra is not None:
            check_option("intra", intra, Fn.INTRA_MODES)
        check_int("top_k", top_k, minimum=1, allow_none=True)
        check_temperature("temperature", temperature)
        for name in ("exclude_self", "renormalize"):
            if not isinstance(locals()[name], bool):
                fail(name, "True or False", locals()[name])
        if resp_cols is None and resp_rows is not None and intra is not None and (
                n != student_z.shape[0] or student_z.ndim == 3):
            fail("resp_cols", f"responsibilities of the {student_z.shape[-2]} student samples (resp_rows has "
                 f"{n} rows)" + (", one pool per row" if student_z.ndim == 3 else ""), None)
        diagonal = _check_plan_inputs(teacher_z, student_z, resp_rows if intra else None,
                                      resp_cols if intra else None, teacher_choice, teacher_index)
        mixed = _check_mixed(mixed, n, student_z.device)
    elif teacher_index is not None:
        arange = torch.arange(n, device=teacher_index.device)
        diagonal = (pool_index is None and student_z.ndim == 2 and n <= student_z.shape[0]
                    and bool(torch.equal(teacher_index, arange)))
    device = student_z.device
    if teacher_choice is None:
        teacher_choice = torch.zeros(n, dtype=torch.long, device=device)
    choice = teacher_choice.to(device)
    if len(teacher_z) == 1:
        rows_z = teacher_z[0]
    else:  # row r's latent under its own teacher
        rows_z = torch.stack(list(teacher_z))[choice, torch.arange(n, device=device)]
    own = None
    if teacher_index is not None:
        own = None if diagonal else teacher_index.to(device)  # (None: the diagonal, the kernels' fast path)
    else:  # the rows' own samples are not candidates: nothing to weight or to exclude
        self_weight, exclude_self = None, False
    intra_w = None
    if intra is not None and resp_rows is not None:
        intra_w = Fn._intra_modal_weights(resp_rows, resp_cols, intra).float()
    inter = Fn._inter_modal_weights(rows_z, student_z, similarity, normalize,
                                    None if temperature is None else float(temperature),
                                    None if self_weight is None else float(self_weight), own, pool_index).float()
    dense, kept = _final_weights(inter, intra_w, top_k, exclude_self, renormalize, own, mixed)
    return _layout(dense.float(), top_k=top_k, mixed=mixed, teacher_index=teacher_index, teacher=tuple(teacher),
                   teacher_choice=choice, inter=inter, intra=intra_w, diagonal=bool(diagonal), candidates=kept)


def _final_weights(inter: torch.Tensor, intra: Optional[torch.Tensor], top_k: Optional[int], exclude_self: bool,
                   renormalize: bool, own: Optional[torch.Tensor], mixed: torch.Tensor) -> Tuple[torch.Tensor, Any]:
    """:func:`functional._dca_weights_and_index` of the rows; with ``top_k`` on the CPU, of the mixed rows only.

    A row that is not mixed copies its own sample, so its top-k is never used: those rows of
    the result are 0 and their ``kept`` columns 0 (:func:`_layout` ignores both). Each row's
    values are its own (row-wise operations), the same as over all rows.
    """
    n = inter.shape[0]
    if top_k is None or inter.device.type != "cpu" or top_k >= inter.shape[1] or bool(mixed.all()) or n == 0:
        return Fn._dca_weights_and_index(inter, intra, top_k, exclude_self, renormalize, own)
    rows = mixed.nonzero().reshape(-1)
    dense = inter.new_zeros(inter.shape)
    kept = torch.zeros(n, top_k, dtype=torch.long)
    if len(rows):
        own_rows = rows if own is None else own.index_select(0, rows)
        part, part_kept = Fn._dca_weights_and_index(inter.index_select(0, rows),
                                                    None if intra is None else intra.index_select(0, rows),
                                                    top_k, exclude_self, renormalize, own_rows)
        dense.index_copy_(0, rows, part.to(dense.dtype))
        kept.index_copy_(0, rows, part_kept)
    return dense, kept


def make_plan(teacher_z: Union[torch.Tensor, Mapping[str, torch.Tensor]], student_z: torch.Tensor, *,
              resp_rows: Optional[torch.Tensor] = None, resp_cols: Optional[torch.Tensor] = None,
              teacher_index: Optional[torch.Tensor] = None, similarity: str = "abs_cosine",
              normalize: str = "row", temperature: Optional[float] = None,
              self_weight: Optional[float] = None, intra: Optional[str] = "soft",
              top_k: Optional[int] = None, exclude_self: bool = False, renormalize: bool = True,
              p: float = 1.0, generator: Optional[torch.Generator] = None) -> MixPlan:
    """Draw a :class:`MixPlan` from latents: the draws from ``generator``, the rest :func:`build_plan`.

    Draws, from ``generator`` only, which rows are mixed (each with probability ``p``) and,
    with several teachers, which teacher guides each row (uniformly). The draw order is
    fixed: first ``rand(n)`` for ``mixed``, then ``randint`` for the teacher choice. A row
    whose weights keep all their mass on its own sample is the original sample (not mixed).

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
        >>> s = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
        >>> plan = make_plan(t, s, intra=None, generator=torch.Generator().manual_seed(0))
        >>> plan.dense(3)
        tensor([[0.6250, 0.3750, 0.0000],
                [0.0000, 0.4444, 0.5556]])
    """
    p = check_probability("p", p)
    check_int("top_k", top_k, minimum=1, allow_none=True)  # checked before anything is drawn
    for label, value in (("student_z", student_z), ("resp_rows", resp_rows), ("resp_cols", resp_cols),
                         ("teacher_index", teacher_index)):
        if not isinstance(value, torch.Tensor) and (value is not None or label == "student_z"):
            fail(label, "a torch.Tensor" + ("" if label == "student_z" else " or None"), value)
        check_tensor_data(label, value)  # before any copy to student_z's device
    generator = _draw_generator(generator)
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
        if latent.shape[0] != latents[0].shape[0]:
            fail(label, f"{latents[0].shape[0]} rows like the first teacher", latent, ShapeError)
    _check_latents("student_z", student_z)
    device = student_z.device
    n, m = latents[0].shape[0], student_z.shape[0]
    if teacher_index is None:
        teacher_index = _own_positions(None, n, m, device)
    elif self_weight is not None or exclude_self:
        _check_long("teacher_index", teacher_index, 1)
        if not torch.equal(teacher_index.cpu(), torch.arange(teacher_index.numel())):
            fail("teacher_index", "None or arange(n) when self_weight or exclude_self is used "
                 "(they treat column r as row r's own sample)", teacher_index)
    for label, latent in zip(labels, latents):
        if latent.shape[1] != student_z.shape[1]:
            fail(label, f"{student_z.shape[1]} columns like student_z", latent, ShapeError)
        if latent.device != device:
            fail(label, f"a tensor on {device} like student_z", latent, DeviceError)

    # ---- every random draw of the plan, from `generator` only, in a fixed order
    mixed = torch.rand(n, generator=generator, device=generator.device) < p
    if len(latents) > 1:
        choice = torch.randint(len(latents), (n,), generator=generator, device=generator.device)
    else:
        choice = torch.zeros(n, dtype=torch.int64)
    if resp_rows is None or intra is None:
        resp_rows = resp_cols = None
    plan = build_plan(latents, student_z, mixed=mixed.to(device), teacher_choice=choice.to(device),
                      resp_rows=None if resp_rows is None else resp_rows.to(device),
                      resp_cols=None if resp_cols is None else resp_cols.to(device), teacher_index=teacher_index,
                      teacher=names, similarity=similarity, normalize=normalize, temperature=temperature,
                      self_weight=self_weight, intra=intra, top_k=top_k, exclude_self=exclude_self,
                      renormalize=renormalize)
    if not names:  # a single unnamed teacher records no choice
        object.__setattr__(plan, "teacher_choice", None)
    return plan
