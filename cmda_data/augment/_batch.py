"""Batch-level plumbing shared by CMDACollate and CMDAugment (private).

A collated batch is a dict (fields are keys) or a tuple/list (fields are positions).
:func:`mix_batch` applies one :class:`~cmda_data.MixPlan` to the student field and the
target, adds the ``mix_info`` record and returns a new batch (the input is not modified).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import get_worker_info

from ..core._fields import Field, ImageField, check_targets_batch, get_field, student_pixels
from ..core._kernels import _targets_as_probabilities
from ..core._validation import fail
from ..exceptions import DeviceError, FieldError

__all__ = ["batch_index", "batch_student", "check_cpu_bank_in_workers", "keep_real_batch", "mix_batch", "mix_info",
           "name_nonfinite_row", "pack", "pack_batch", "with_field"]


def batch_field(batch: Any, field: Field, what: str = "batch") -> Any:
    """``batch[field]`` for dict or tuple batches, with a :class:`FieldError` naming the field."""
    return get_field(batch, field, what)


def batch_index(batch: Any, index_field: Optional[Field]) -> Optional[torch.Tensor]:
    """The dataset indices ``[B]`` carried by a batch (None when ``index_field`` is None).

    For tuple batches a string ``index_field`` means the last position (the rule of
    :class:`~cmda_data.IndexedDataset`).
    """
    if index_field is None:
        return None
    field = -1 if isinstance(index_field, str) and not isinstance(batch, Mapping) else index_field
    value = get_field(batch, field, "batch")
    if not isinstance(value, torch.Tensor) or value.ndim != 1 or value.is_floating_point() or \
            value.dtype == torch.bool:
        fail(f"field {index_field!r} of the batch", "integer dataset indices [B] (wrap the dataset in "
             "IndexedDataset so every sample carries its index)", value, FieldError)
    return value.long()


def batch_student(batch: Any, field: Field, image: Optional[ImageField] = None) -> torch.Tensor:
    """The student field of a batch: a floating-point tensor ``[B, ...]``.

    uint8 pixels (any integer pixels when ``image`` declares the field an image) come back
    as float32 (see :func:`cmda_data.core._fields.student_pixels`).
    """
    value = get_field(batch, field, "batch")
    if not isinstance(value, torch.Tensor):
        fail(f"field {field!r} of the batch", "a floating-point tensor [B, ...]", value, FieldError)
    return student_pixels(value, image, field)


def check_cpu_bank_in_workers(bank: Any, owner: str) -> None:
    """Refuse a bank on a GPU inside a DataLoader worker process (CUDA cannot run there)."""
    if bank.device.type != "cpu" and get_worker_info() is not None:
        fail(f"{owner} bank", "a CPU bank inside DataLoader worker processes (CUDA cannot run in workers): use "
             "bank.to('cpu'), or mix on the GPU after the loader with CMDAugment", f"a bank on {bank.device}",
             DeviceError, raw=True)


def name_nonfinite_row(student: torch.Tensor, index: Optional[torch.Tensor], field: Field) -> None:
    """If a row of ``student`` holds NaN or inf, raise naming the field and that row's sample.

    Called when mixing refused a batch, so the error says which sample to look at
    (``index``: the rows' dataset indices; None: rows are named by batch position).
    """
    if not isinstance(student, torch.Tensor) or not student.is_floating_point() or not student.numel():
        return
    bad = ~torch.isfinite(student.reshape(student.shape[0], -1))
    rows = bad.any(1).nonzero().reshape(-1)
    if rows.numel():
        row = int(rows[0])
        where = f"sample {int(index[row])}" if index is not None else f"row {row} of the batch"
        fail(f"field {field!r} of {where}", "finite values (no NaN or inf)",
             f"{int(bad[row].sum())} non-finite entries (rows with any: {rows.numel()} of {student.shape[0]})",
             raw=True)


def pack(tensors: Sequence[torch.Tensor], *, shared: bool = False) -> List[torch.Tensor]:
    """Copies of CPU ``tensors`` that are views of ONE storage (in shared memory if ``shared``).

    A DataLoader worker sends every storage of a batch to the main process separately (a
    shared-memory segment and a file descriptor passed over a socket each): for small
    batches that costs more than collating. One storage per batch crosses as one segment.
    The same tensor object given twice gives one view. Dtypes and shapes are kept.

    Examples:
        >>> a, b, c = pack([torch.arange(3), torch.tensor([0.5, 1.5]), torch.tensor([True])])
        >>> a.tolist(), b.tolist(), c.tolist()
        ([0, 1, 2], [0.5, 1.5], [True])
        >>> a.untyped_storage().data_ptr() == c.untyped_storage().data_ptr()
        True
    """
    unique: Dict[int, torch.Tensor] = {}
    for tensor in tensors:
        unique.setdefault(id(tensor), tensor)
    order = sorted(unique, key=lambda key: -unique[key].element_size())  # widest first: aligned offsets
    offsets, total = {}, 0
    for key in order:
        size = unique[key].element_size()
        total = (total + size - 1) // size * size
        offsets[key] = total
        total += unique[key].numel() * size
    # allocated in shared memory directly (share_memory_() would allocate, then copy into a new segment)
    storage = torch.UntypedStorage._new_shared(max(total, 1)) if shared else torch.UntypedStorage(max(total, 1))
    views: Dict[int, torch.Tensor] = {}
    for key, tensor in unique.items():
        view = torch.empty(0, dtype=tensor.dtype)
        view.set_(storage, offsets[key] // tensor.element_size(), tuple(tensor.shape))
        views[key] = view.copy_(tensor)
    return [views[id(tensor)] for tensor in tensors]


def pack_batch(batch: Any, info_key: str, *, shared: bool) -> Any:
    """``batch`` with its CPU tensors (top level and the ``mix_info`` record) packed by :func:`pack`."""
    is_dict = isinstance(batch, Mapping)
    items = dict(batch) if is_dict else dict(enumerate(batch))
    info_at = info_key if is_dict else len(items) - 1
    info = dict(items[info_at]) if isinstance(items.get(info_at), Mapping) else {}
    places = [(None, k) for k, v in items.items() if _packable(v)] + [(info_at, k) for k, v in info.items()
                                                                       if _packable(v)]
    tensors = [items[k] if where is None else info[k] for where, k in places]
    for (where, key), view in zip(places, pack(tensors, shared=shared)):
        if where is None:
            items[key] = view
        else:
            info[key] = view
    if info:
        items[info_at] = info
    return items if is_dict else tuple(items[i] for i in range(len(items)))


def _packable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and not value.is_sparse and \
        not value.is_nested and not value.requires_grad


def mix_info(plan: Any, index: Optional[torch.Tensor]) -> Dict[str, Optional[torch.Tensor]]:
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
    k = plan.index.shape[1]
    square = own.shape[0] == index.shape[0] and bool(torch.equal(own, torch.arange(len(index), device=own.device)))
    return {"index": index if square else index.index_select(0, own),
            "partners": index.index_select(0, plan.index.reshape(-1)).view(-1, k), "weights": plan.weights,
            "mixed": plan.mixed, "teacher": plan.teacher_choice}


def mix_batch(batch: Any, plan: Any, *, student: Field, target: Optional[Field], num_classes: Optional[int],
              label_smoothing: float, index: Optional[torch.Tensor], info_key: str = "mix_info",
              inplace: bool = False) -> Any:
    """A new batch: mixed student, soft targets ``[B, C]`` and ``mix_info`` added.

    Dict batches get ``batch[info_key]``; tuple batches get the record appended last.
    ``inplace`` (only for a batch the caller just collated itself, never user input, and a
    square plan) writes the mixed rows into the collated student tensor instead of a new one.
    """
    samples = batch_student(batch, student)
    updates = {student: plan.apply(samples, inplace=inplace)}
    if target is not None:
        targets = check_targets_batch(get_field(batch, target, "batch"), target, num_classes)
        updates[target] = plan.apply_targets(targets, num_classes, label_smoothing)
    info = mix_info(plan, index)
    if isinstance(batch, Mapping):
        out = dict(batch)
        out.update(updates)
        out[info_key] = info
        return out
    items = list(batch)
    for position, value in updates.items():
        items[position] = value
    items.append(info)
    return tuple(items)


def with_field(batch: Any, field: Field, value: Any) -> Any:
    """A shallow copy of a dict or tuple batch with ``batch[field] = value``."""
    if isinstance(batch, Mapping):
        out = dict(batch)
        out[field] = value
        return out
    items = list(batch)
    items[field] = value
    return tuple(items)


def _cat_rows(real: Any, generated: Any, rows: torch.Tensor, b: int) -> Any:
    """``real`` followed by ``generated[rows]`` for one batched field (tensor, list or dict of them)."""
    if isinstance(real, torch.Tensor) and real.ndim >= 1 and real.shape[0] == b:
        return torch.cat([real, generated.index_select(0, rows.to(generated.device))])
    if isinstance(real, Mapping):
        return {key: _cat_rows(value, generated[key], rows, b) for key, value in real.items()}
    if isinstance(real, (list, tuple)) and len(real) == b:
        return type(real)([*real, *(generated[r] for r in rows.tolist())])
    return real  # not batched: kept as is


def keep_real_batch(real: Any, mixed: Any, plan: Any, *, target: Optional[Field], num_classes: Optional[int],
                    label_smoothing: float, info_key: str = "mix_info") -> Any:
    """The ``keep_real`` batch: the ``B`` real rows, then the ``G`` rows the plan mixed.

    ``real`` is the collated batch (student not mixed) and ``mixed`` the output of
    :func:`mix_batch` for it and ``plan`` (``B`` rows, row ``r``'s own sample is ``r``).
    Every field gets ``B + G`` rows: the real rows as collated, then ``mixed``'s rows
    ``plan.mixed.nonzero()`` in batch order. The target is soft ``[B + G, C]`` in both
    parts (real rows: one-hot with label smoothing); ``mix_info`` describes all ``B + G``
    rows (real rows: the identity, ``"mixed"`` False; appended rows: ``"mixed"`` True),
    plus ``"source"`` ``[B + G]``: the position in the real part of the row each row comes
    from (``arange(B)``, then the positions of the mixed rows).
    """
    rows = plan.mixed.nonzero().reshape(-1)
    is_dict = isinstance(real, Mapping)
    info = mixed[info_key] if is_dict else mixed[-1]
    b = int(plan.mixed.shape[0])
    out: Dict[Any, Any] = {}
    for key in (list(real.keys()) if is_dict else range(len(real))):
        if is_dict and key == info_key:
            continue
        if target is not None and key == target:
            targets = check_targets_batch(get_field(real, target, "batch"), target, num_classes)
            soft = _targets_as_probabilities(targets, num_classes, label_smoothing)
            out[key] = _cat_rows(soft.to(mixed[key].dtype), mixed[key], rows, b)
        else:
            out[key] = _cat_rows(real[key], mixed[key], rows, b)
    weights = info["weights"]
    identity = torch.zeros_like(weights)
    identity[:, 0] = 1.0
    own = info["index"]
    real_info = {"index": own, "partners": own[:, None].expand(-1, weights.shape[1]), "weights": identity,
                 "mixed": torch.zeros_like(info["mixed"]), "teacher": info["teacher"]}
    new_info = dict(info)
    for key, value in real_info.items():
        if value is not None and info.get(key) is not None:
            new_info[key] = _cat_rows(value, info[key], rows, b)
    positions = torch.arange(b, device=info["mixed"].device)
    new_info["source"] = torch.cat([positions, rows.to(positions.device)])
    if is_dict:
        out[info_key] = new_info
        return out
    return (*(out[i] for i in range(len(real))), new_info)
