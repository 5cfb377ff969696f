"""The per-sample mix (private): one sample and its candidate pool -> one mixed sample.

Shared by :class:`~cmda_data.CrossModalAugmentedDataset` (a pool drawn from the dataset) and
:class:`~cmda_data.CandidateBuffer` (a pool of recent stream samples): the plan of the one
row comes from :func:`cmda_data.bank._plan.bank_plan`, the partners with a non-zero weight are
read, and the student field and the target are mixed with the plan's weights.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch

from ..bank._plan import bank_plan
from ..core import functional as Fn
from ..core._fields import as_student, as_target, get_field, replace_fields
from ..core._validation import fail
from ..exceptions import FieldError, ValidationError
from ._batch import name_nonfinite_row

__all__ = ["mix_sample"]


def mix_sample(owner: Any, sample: Any, index: int, *, mixed: bool, teacher: int, width: int,
               pool: Optional[torch.Tensor], fetch: Callable[[int], Any]) -> Any:
    """``sample`` (dataset ``index``) mixed with partners from ``pool``, with its ``mix_info`` record.

    Args:
        owner: the entry point (``bank``, ``epoch``, ``_current_spec()``, the output fields).
        sample: the sample itself.
        index: its dataset index.
        mixed: the row's draw (False: the sample is returned unmixed, with the identity record).
        teacher: the row's drawn teacher.
        width: ``k`` of the record (partners padded with ``index`` and weight 0).
        pool: ``[m]`` dataset indices of the candidates (the sample's own index among them
            unless ``exclude_self``); None or empty: not mixed.
        fetch: dataset index -> sample, for the partners (never called for ``index``).
    """
    field = owner.student_field
    student = as_student(get_field(sample, field, index), field, index)
    partners = torch.full((width,), index, dtype=torch.long)
    weights = torch.zeros(width)
    weights[0] = 1.0
    if mixed and pool is not None and len(pool):
        plan = bank_plan(owner.bank, torch.tensor([index]), pool, owner._current_spec(), owner.epoch,
                         mixed=torch.tensor([True]), teacher_choice=torch.tensor([teacher])).to("cpu")
        mixed = bool(plan.mixed[0])
        if mixed:
            k = plan.index.shape[1]
            partners[:k] = pool[plan.index[0]]
            weights[:] = 0.0
            weights[:k] = plan.weights[0]
    else:
        mixed = False
    used: List[int] = (weights > 0).nonzero().reshape(-1).tolist() if mixed else [0]
    chosen = [(int(partners[u]), sample if int(partners[u]) == index else fetch(int(partners[u]))) for u in used]
    updates = {}
    if mixed:
        values = []
        for j, other in chosen:
            value = as_student(get_field(other, field, j), field, j)
            if value.shape != student.shape:
                fail(f"field {field!r} of sample {j}", f"shape {tuple(student.shape)} like sample {index} "
                     "(its mixing partner)", tuple(value.shape), FieldError)
            values.append(value)
        stack = torch.stack(values)
        try:
            updates[field] = Fn.mix(weights[used][None].to(stack.device), stack)[0]
        except ValidationError:
            name_nonfinite_row(stack, torch.tensor([j for j, _ in chosen]), field)
            raise
    if owner.target is not None:
        targets = torch.stack([as_target(get_field(s, owner.target, j), owner.target, j, owner.num_classes)
                               for j, s in chosen])
        if targets.ndim == 1 and owner.num_classes is None:
            fail("num_classes", f"an integer (field {owner.target!r} holds class indices)", None)
        updates[owner.target] = Fn.mix_targets(weights[used][None], targets, owner.num_classes,
                                               owner.label_smoothing)[0]
    info = {"index": torch.tensor(index), "partners": partners, "weights": weights,
            "mixed": torch.tensor(mixed), "teacher": torch.tensor(teacher)}
    return replace_fields(sample, updates, extra={owner.info_key: info})
