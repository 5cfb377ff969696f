"""Plans over dataset indices: latents and responsibilities looked up in a bank (private).

Every entry point comes here (and :meth:`EmbeddingBank.plan <cmda_data.bank.EmbeddingBank.plan>`),
so the same seed gives the same mixed samples whenever the candidate pool is the same:

1. :func:`row_draws`: per row, from the row's key (a fixed 64-bit hash of
   ``(seed, epoch, rank, dataset index)``), whether it is mixed (Bernoulli ``p``) and which
   teacher guides it (uniform over the teachers); vectorised over the rows of a batch,
   identical for one row in the dataset.
2. :func:`bank_plan`: the rows' teacher latents, the candidates' student latents and both
   responsibilities are looked up in the bank and handed to
   :func:`cmda_data.core.build.build_plan`, with ``validate=False``: the bank's tensors were
   checked when the bank was built (finite float32 latents); the dataset indices are checked
   by ``bank.positions`` and the responsibilities once per table.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Optional, Tuple

import torch

from ..core._kernels import _check_resp
from ..core._seeding import draw_rows
from ..core._validation import fail
from ..core.build import build_plan
from ..core.plan import MixPlan
from ..exceptions import CMDAError, ShapeError

__all__ = ["bank_plan", "row_draws"]


def row_draws(indices: torch.Tensor, spec: Any, epoch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mixed [n] bool, teacher_choice [n] long)`` on the CPU, from each row's key."""
    return draw_rows(indices.reshape(-1).long().cpu().numpy(), seed=spec.seed, epoch=epoch, rank=spec.rank,
                     p=spec.p, n_teachers=len(spec.teachers))


#: id(responsibility table) -> (weak reference, tensor version) of tables whose every row passed _check_resp
_VALID_RESP: Dict[int, Tuple[Any, int]] = {}


def _all_rows_valid(resp: torch.Tensor) -> bool:
    """Whether every row of the bank's responsibilities passes ``_check_resp`` (checked once per table).

    A table with an invalid row returns False, so each plan's rows are checked (and a plan
    that uses such a row raises). In-place changes of the table bump its version.
    """
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


def _responsibilities(bank: Any, positions: torch.Tensor, name: str) -> torch.Tensor:
    resp = bank.responsibilities
    rows = resp.index_select(0, positions)
    if not _all_rows_valid(resp):  # only then can these rows be invalid
        _check_resp(name, rows)
    return rows


def bank_plan(bank: Any, rows: torch.Tensor, pool: torch.Tensor, spec: Any, epoch: int, *,
              mixed: Optional[torch.Tensor] = None, teacher_choice: Optional[torch.Tensor] = None,
              teacher_index: Optional[torch.Tensor] = None) -> MixPlan:
    """The plan of teacher rows ``rows`` over candidates ``pool`` (both dataset indices) of ``bank``.

    ``pool``: ``[m]`` candidates shared by the rows, or ``[n, m]``: one pool per row (the
    dataset's per-item pools; the plan's positions are then in each row's own pool).
    ``spec``: a :class:`~cmda_data.options.PlanOptions`. ``mixed`` and ``teacher_choice``
    default to :func:`row_draws`. ``teacher_index``: position of each row's own sample in
    ``pool``; by default found there (a row whose own sample is not a candidate: None, then
    every row must be mixed).
    """
    same = pool is rows
    rows = torch.as_tensor(rows).reshape(-1).long().cpu()
    pool = rows if same else torch.as_tensor(pool).long().cpu()
    per_row = pool.ndim == 2
    if per_row and pool.shape[0] != len(rows):
        fail("pool", f"[{len(rows)}, m] dataset indices, one pool per row", pool, ShapeError)
    pool = pool if per_row else pool.reshape(-1)
    square = same or (not per_row and rows.shape == pool.shape and bool(torch.equal(rows, pool)))
    if mixed is None or teacher_choice is None:
        mixed, teacher_choice = row_draws(rows, spec, epoch)
    if spec.intra is not None and bank.responsibilities is None:
        fail("intra", "None for a bank without a GMM (or build the bank with fit_gmm=True)", spec.intra)
    device = bank.device
    row_pos = bank.positions(rows)
    pool_pos = row_pos if square else bank.positions(pool)
    if square:
        teacher_index = torch.arange(len(rows), device=device)
    elif teacher_index is None:
        hits = (pool if per_row else pool[None, :]) == rows[:, None]
        found = hits.any(1)
        if bool(found.all()):
            teacher_index = hits.float().argmax(1).to(device)
    else:
        teacher_index = teacher_index.to(device)
    tables = bank.embeddings
    resp_rows = resp_cols = None
    if spec.intra is not None:
        resp_rows = _responsibilities(bank, row_pos, "resp_rows")
        resp_cols = None if square else _responsibilities(bank, pool_pos, "resp_cols")
    pool_index = None
    if per_row:  # [n, m, M] responsibilities; the latents: each distinct candidate once, pools as positions
        resp_cols = None if resp_cols is None else resp_cols.view(*pool.shape, resp_cols.shape[1])
        pool_pos, pool_index = torch.unique(pool_pos, return_inverse=True)
        pool_index = pool_index.view(pool.shape)
    student = tables[spec.student].index_select(0, pool_pos)
    return build_plan([tables[t].index_select(0, row_pos) for t in spec.teachers],
                      student, mixed=mixed.to(device),
                      teacher_choice=teacher_choice.to(device), resp_rows=resp_rows, resp_cols=resp_cols,
                      teacher_index=teacher_index, teacher=tuple(spec.teachers), similarity=spec.similarity,
                      normalize=spec.normalize, temperature=spec.temperature, self_weight=spec.self_weight,
                      intra=spec.intra, top_k=spec.top_k, exclude_self=spec.exclude_self,
                      renormalize=spec.renormalize, validate=False, pool_index=pool_index)
