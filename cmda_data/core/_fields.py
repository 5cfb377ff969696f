"""Access to the fields of a sample (private).

A sample is a mapping (``{"image": ..., "text": ..., "label": ...}``: fields are keys) or a
tuple/list (``(image, text, label)``: fields are integer positions). Every error names the
field and the index of the sample at fault.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Dict, Iterable, Optional, Union

import numpy as np
import torch

from ..exceptions import FieldError, ValidationError
from ._validation import fail, field_error

__all__ = [
    "Field",
    "as_index",
    "as_student",
    "as_target",
    "get_field",
    "replace_fields",
    "resolve_fields",
]

Field = Union[str, int]

TOKEN_ID_HINT = (
    "a floating-point tensor (integer token ids cannot be interpolated: "
    "mix embeddings instead, e.g. make the text embedding the student field)"
)


def check_field_name(name: str, field: Any) -> Field:
    """A field is a non-empty string (dict samples) or an integer position (tuple samples)."""
    if isinstance(field, bool) or not isinstance(field, (str, int)) or field == "":
        fail(name, "a field name (str) or a tuple position (int)", field)
    return field


def resolve_fields(modalities: Iterable[str], fields: Optional[Mapping[str, Field]]) -> Dict[str, Field]:
    """Map each modality to its sample field; by default the field is named like the modality.

    Examples:
        >>> resolve_fields(["image", "text"], {"image": 0, "text": 1})
        {'image': 0, 'text': 1}
        >>> resolve_fields(["image"], None)
        {'image': 'image'}
    """
    fields = dict(fields or {})
    resolved: Dict[str, Field] = {}
    for modality in modalities:
        resolved[modality] = check_field_name(f"fields[{modality!r}]", fields.get(modality, modality))
    return resolved


def get_field(sample: Any, field: Field, index: Any) -> Any:
    """Return ``sample[field]``; raise :class:`FieldError` naming the field and sample index.

    Examples:
        >>> get_field({"a": 1}, "a", 0), get_field((5, 6), 1, 0)
        (1, 6)
        >>> get_field({"a": 1}, "b", 7)
        Traceback (most recent call last):
        ...
        cmda_data.exceptions.FieldError: field 'b' of sample 7: expected ...
    """
    if isinstance(sample, Mapping):
        if field not in sample:
            keys = ", ".join(repr(k) for k in list(sample)[:12])
            field_error(field, index, f"a key of the sample (keys: {keys})", "a sample without it")
        return sample[field]
    if isinstance(sample, Sequence) and not isinstance(sample, (str, bytes)):
        if isinstance(field, str):
            field_error(field, index, "a dict sample for a named field (use integer positions "
                        "for tuple samples, e.g. fields={'image': 0})", f"a {type(sample).__name__} sample")
        if not -len(sample) <= field < len(sample):
            field_error(field, index, f"a position of a sample of length {len(sample)}", field)
        return sample[field]
    field_error(field, index, "a dict or tuple sample", sample)


def replace_fields(sample: Any, updates: Mapping[Field, Any], *, extra: Optional[Mapping[str, Any]] = None) -> Any:
    """A new sample with ``updates`` applied; the input sample is never modified.

    Dicts are shallow-copied (``extra`` entries added); tuples and lists are rebuilt with
    the replaced positions (``extra`` values appended in order).

    Examples:
        >>> s = {"a": 1, "b": 2}
        >>> replace_fields(s, {"a": 9}, extra={"c": 3}), s
        ({'a': 9, 'b': 2, 'c': 3}, {'a': 1, 'b': 2})
        >>> replace_fields((1, 2), {0: 9}, extra={"c": 3})
        (9, 2, 3)
    """
    if isinstance(sample, Mapping):
        out = dict(sample)
        out.update(updates)
        if extra:
            out.update(extra)
        return out
    items = list(sample)
    for position, value in updates.items():
        items[position] = value
    if extra:
        items.extend(extra.values())
    return items if isinstance(sample, list) else tuple(items)


def as_student(value: Any, field: Field, index: Any) -> torch.Tensor:
    """Check a student field: a floating-point tensor (numpy arrays are converted).

    Integer tensors (token ids) raise a :class:`FieldError` telling to mix embeddings.
    """
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        field_error(field, index, "a floating-point tensor", value)
    if not value.is_floating_point():
        field_error(field, index, TOKEN_ID_HINT, value)
    return value


def as_index(value: Any, field: Field, where: str, hint: str) -> int:
    """Check a dataset-index field: an int, numpy integer or integer scalar tensor; ``where``
    names the sample (``"3 of the batch"``), ``hint`` says how to get an index."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value)
    elif isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        field_error(field, where, f"an int dataset index ({hint})", value)
    return value


def as_target(value: Any, field: Field, index: Any, num_classes: Optional[int] = None) -> torch.Tensor:
    """Check a target field: a class index (int or integer scalar tensor; in ``[0, num_classes)``
    when ``num_classes`` is given) or a float vector [C]."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = torch.tensor(int(value), dtype=torch.long)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() and value.dtype != torch.bool and value.ndim == 0:
            if num_classes is not None and not 0 <= int(value) < num_classes:
                field_error(field, index, f"a class index in [0, {num_classes}) (num_classes)", int(value))
            return value.long()
        if value.is_floating_point() and value.ndim == 1:
            return value
    field_error(field, index, "a class index (int) or a float vector of class scores [C]", value)


def check_targets_batch(targets: Any, field: Field, num_classes: Optional[int]) -> torch.Tensor:
    """Check collated targets: class indices [B] (need ``num_classes``) or floats [B, C]."""
    if not isinstance(targets, torch.Tensor):
        fail(f"field {field!r} of the batch", "class indices [B] or class scores [B, C]", targets, FieldError)
    if targets.is_floating_point():
        if targets.ndim != 2:
            fail(f"field {field!r} of the batch", "float class scores of shape [B, C]", targets, FieldError)
        return targets
    if targets.ndim != 1 or targets.dtype == torch.bool:
        fail(f"field {field!r} of the batch", "integer class indices of shape [B]", targets, FieldError)
    if num_classes is None:
        fail("num_classes", f"an integer (field {field!r} holds class indices)", None, ValidationError)
    return targets
