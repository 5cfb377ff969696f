"""The per-sample mix (private): samples and their candidate pools -> mixed samples.

Shared by :class:`~cmda_data.CrossModalAugmentedDataset` (pools drawn from the dataset, a
whole DataLoader batch at once) and :class:`~cmda_data.CandidateBuffer` (a pool of recent
stream samples, one sample at a time): the plans of the rows come from ONE call of
:func:`cmda_data.bank._plan.bank_plan` with one pool per row, the partners with a non-zero
weight are read (each once per call), and the student field and the target are mixed with
the plans' weights.

Every computation is row by row (the plan's weights, then each row's weighted sum of its
partners by the collate's sparse-mix kernel, which sums every row on its own), so a row's
values do not depend on the other rows of the call: a batch gives exactly the samples that
the rows give one at a time.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..bank._plan import bank_plan
from ..core._fields import as_student, as_target, get_field, replace_fields
from ..core._kernels import _mix_sparse_cpu, _normalize_rows, _targets_as_probabilities
from ..core._validation import fail
from ..exceptions import FieldError
from ._batch import name_nonfinite_row

__all__ = ["mix_sample", "mix_samples"]

#: latents per plan call (rows x pool x d): larger batches are planned in chunks of rows
_PLAN_ELEMENTS = 1 << 22


def _weighted_sum(weights: torch.Tensor, slots: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_t weights[r, t] * table[slots[r, t]]``: the CPU sparse-mix kernel of the collate.

    ``embedding_bag`` sums each row's bag on its own (the same arithmetic whatever the other
    rows and however the columns are blocked), so row ``r`` gets the same bits in a batch as
    alone.
    """
    if table.shape[1] == 0:
        return table.new_zeros(slots.shape[0], 0)
    return _mix_sparse_cpu(slots, weights.to(table.dtype), table.contiguous())[0]


def _first_seen(ids: np.ndarray, live: np.ndarray) -> Tuple[List[int], np.ndarray]:
    """The distinct ``ids[live]`` in row-major order of first appearance, and ``[n, k]`` slots into them.

    A slot that is not live (weight 0) points at its row's first live slot (it adds exactly 0).
    """
    unique, first, inverse = np.unique(ids[live], return_index=True, return_inverse=True)
    by_first = np.argsort(first, kind="stable")
    rank = np.empty(len(unique), dtype=np.int64)
    rank[by_first] = np.arange(len(unique))
    slots = np.zeros(ids.shape, dtype=np.int64)
    slots[live] = rank[inverse.reshape(-1)]
    fill = slots[np.arange(ids.shape[0]), live.argmax(1)]
    return unique[by_first].tolist(), np.where(live, slots, fill[:, None])


def _field(sample: Any, field: Any, index: int) -> Any:
    """:func:`get_field` (a dict's key looked up directly)."""
    if type(sample) is dict and field in sample:
        return sample[field]
    return get_field(sample, field, index)


def _student(value: Any, field: Any, index: int, image: Any = None) -> torch.Tensor:
    """:func:`as_student` (a float tensor passes directly; uint8 pixels and PIL images become float32)."""
    if type(value) is torch.Tensor and value.is_floating_point() and not value.is_meta:
        return value
    return as_student(value, field, index, image)


def _class_indices(values: List[Any], field: Any, indices: List[int], num_classes: Optional[int]) -> torch.Tensor:
    """Targets ``[u]`` (class indices) or ``[u, C]`` (scores) of the samples used, checked like :func:`as_target`."""
    if all(type(v) is int for v in values):  # plain ints: checked at once (the first bad one words the error)
        if num_classes is not None:
            for v, j in zip(values, indices):
                if not 0 <= v < num_classes:
                    as_target(v, field, j, num_classes)
        return torch.tensor(values, dtype=torch.long)
    return torch.stack([as_target(v, field, j, num_classes) for v, j in zip(values, indices)])


def _plans(owner: Any, rows: torch.Tensor, pools: torch.Tensor, teacher: torch.Tensor):
    """``(index [r, k], weights [r, k], mixed [r])`` on the CPU: the plans of ``rows`` over ``pools`` [r, m]."""
    spec, bank = owner._current_spec(), owner.bank
    d = bank.embeddings[spec.student].shape[1]
    step = max(1, _PLAN_ELEMENTS // max(1, pools.shape[1] * d))
    parts = []
    for at in range(0, len(rows), step):  # (rows are independent: chunks change no value)
        part = slice(at, at + step)
        plan = bank_plan(bank, rows[part], pools[part], spec, owner.epoch,
                         mixed=torch.ones(len(rows[part]), dtype=torch.bool),
                         teacher_choice=teacher[part]).to("cpu")
        parts.append((plan.index, plan.weights, plan.mixed))
    return tuple(torch.cat(column) for column in zip(*parts))


def mix_samples(owner: Any, samples: Sequence[Any], indices: Sequence[int], *, mixed: torch.Tensor,
                teacher: torch.Tensor, width: int, pools: Optional[torch.Tensor],
                fetch: Callable[[int], Any]) -> List[Any]:
    """``samples`` (dataset ``indices``) mixed with partners from their pools, each with its ``mix_info``.

    Args:
        owner: the entry point (``bank``, ``epoch``, ``_current_spec()``, the output fields).
        samples: the samples themselves, one per row.
        indices: their dataset indices.
        mixed: ``[n]`` bool draws (False: the sample is returned unmixed, with the identity record).
        teacher: ``[n]`` the rows' drawn teachers.
        width: ``k`` of the records (partners padded with the row's index and weight 0).
        pools: ``[int(mixed.sum()), m]`` dataset indices of the candidates of the mixed rows,
            in row order (a row's own index among them unless ``exclude_self``); None or
            ``m == 0``: no row is mixed.
        fetch: dataset index -> sample, for the partners that are not among ``indices``
            (each read at most once per call).
    """
    n = len(samples)
    field, target, info_key = owner.student_field, owner.target, owner.info_key
    image = getattr(owner, "student_image", None)
    students = [_student(_field(s, field, i), field, i, image) for s, i in zip(samples, indices)]
    index = torch.as_tensor(list(indices), dtype=torch.long)
    partners = index[:, None].repeat(1, width)
    weights = torch.zeros(n, width)
    weights[:, 0] = 1.0
    rows = mixed.nonzero().reshape(-1)
    done = torch.zeros(n, dtype=torch.bool)
    if len(rows) and pools is not None and pools.shape[1]:
        plan_index, plan_weights, keep = _plans(owner, index[rows], pools, teacher[rows])
        rows, k = rows[keep], plan_index.shape[1]
        partners[rows, :k] = pools[keep].gather(1, plan_index[keep])
        weights[rows] = 0.0
        weights[rows, :k] = plan_weights[keep]
        done[rows] = True
    # the samples used (a row's partners with a weight; its own sample when not mixed), each read once
    ids, live = partners.numpy(), (weights > 0).numpy()
    used, slots = _first_seen(ids, live)
    own = dict(zip(reversed(indices), range(n - 1, -1, -1)))  # dataset index -> its first row
    known = {j: samples[r] for j, r in own.items()}
    for j in used:
        if j not in known:
            known[j] = fetch(j)
    # the rows' student values: converted (uint8 or PIL pixels -> float32) or mixed ones replace the field
    out_students: List[Any] = list(students)
    if len(rows):
        at = rows.numpy()
        members, mix_slots = _first_seen(ids[at], live[at])  # the samples mixed into the generated rows
        values = [students[own[j]] if j in own else _student(_field(known[j], field, j), field, j, image)
                  for j in members]
        at_rows = at.tolist()
        if len({v.shape for v in values} | {students[r].shape for r in at_rows}) > 1:
            for r, row in zip(at_rows, mix_slots.tolist()):
                for t in dict.fromkeys(row):  # each partner once, in slot order
                    if values[t].shape != students[r].shape:
                        fail(f"field {field!r} of sample {members[t]}", f"shape {tuple(students[r].shape)} like "
                             f"sample {indices[r]} (its mixing partner)", tuple(values[t].shape), FieldError)
        # a row is mixed in its own sample's dtype (float64 in float64, the others in float32) and returned in
        # it: its value does not depend on the dtypes of the other rows of the call
        dtypes = [students[r].dtype for r in at_rows]
        value_of = dict(zip(members, values))
        for dtype_out in dict.fromkeys(dtypes):
            part = None if len(set(dtypes)) == 1 else [i for i, d in enumerate(dtypes) if d == dtype_out]
            group, slots_of = (members, mix_slots) if part is None else _first_seen(ids[at[part]], live[at[part]])
            dtype = torch.float64 if dtype_out == torch.float64 else torch.float32
            table = torch.stack([v.reshape(-1).to(dtype) for v in (value_of[j] for j in group)])
            out = _weighted_sum(weights[rows if part is None else rows[part]], torch.from_numpy(slots_of), table)
            if not math.isfinite(float(out.sum())):  # a partner with NaN or inf (or an overflow: then no error)
                name_nonfinite_row(table, torch.tensor(group), field)
            mixed_rows = at_rows if part is None else [at_rows[i] for i in part]
            shape = students[mixed_rows[0]].shape
            for r, value in zip(mixed_rows, out.to(dtype_out).view(len(mixed_rows), *shape).unbind(0)):
                out_students[r] = value
    if target is not None:
        targets = _class_indices([_field(known[j], target, j) for j in used], target, used, owner.num_classes)
        if targets.ndim == 1 and owner.num_classes is None:
            fail("num_classes", f"an integer (field {target!r} holds class indices)", None)
        probs = _targets_as_probabilities(targets, owner.num_classes, owner.label_smoothing)
        dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
        at_slots = torch.from_numpy(slots)
        soft = _weighted_sum(_normalize_rows(weights.to(dtype)), at_slots, probs.to(dtype))
        soft_rows = _normalize_rows(soft).float().unbind(0)
    else:
        soft_rows = [None] * n
    return [_with_fields(s, field, v, target, y, info_key, {"index": i, "partners": p, "weights": w, "mixed": m,
                                                              "teacher": t})
            for s, v, y, i, p, w, m, t in zip(samples, out_students, soft_rows, index.unbind(0), partners.unbind(0),
                                             weights.unbind(0), done.unbind(0), teacher.long().unbind(0))]


def _with_fields(sample: Any, field: Any, value: Any, target: Any, soft: Any, info_key: Any, info: dict) -> Any:
    """``sample`` with its student ``field`` set to ``value``, its ``target`` (unless None) to ``soft`` and
    ``info_key`` added: :func:`replace_fields`, a plain dict copied directly."""
    if type(sample) is dict:
        out = sample.copy()
        out[field] = value
        if target is not None:
            out[target] = soft
        out[info_key] = info
        return out
    return replace_fields(sample, {field: value} if target is None else {field: value, target: soft},
                          extra={info_key: info})


def mix_sample(owner: Any, sample: Any, index: int, *, mixed: bool, teacher: int, width: int,
               pool: Optional[torch.Tensor], fetch: Callable[[int], Any]) -> Any:
    """``sample`` (dataset ``index``) mixed with partners from ``pool`` ``[m]``: :func:`mix_samples` of one row.

    ``pool`` None or empty: not mixed.
    """
    mixed = bool(mixed) and pool is not None and len(pool) > 0
    pools = torch.as_tensor(pool, dtype=torch.long).reshape(1, -1) if mixed else None
    return mix_samples(owner, [sample], [index], mixed=torch.tensor([mixed]), teacher=torch.tensor([teacher]),
                       width=width, pools=pools, fetch=fetch)[0]
