"""Access to the fields of a sample (private).

A sample is a mapping (``{"image": ..., "text": ..., "label": ...}``: fields are keys) or a
tuple/list (``(image, text, label)``: fields are integer positions). Every error names the
field and the index of the sample at fault.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Union

import numpy as np
import torch

from ..exceptions import DeviceError, FieldError, ValidationError
from ._validation import fail, field_error

__all__ = [
    "Field",
    "ImageField",
    "as_index",
    "as_student",
    "as_target",
    "field_key",
    "get_field",
    "image_spec",
    "is_pil_image",
    "pil_to_tensor",
    "replace_fields",
    "resolve_fields",
    "student_pixels",
]

Field = Union[str, int]

TOKEN_ID_HINT = (
    "a floating-point tensor (integer token ids cannot be interpolated: "
    "mix embeddings instead, e.g. make the text embedding the student field)"
)
#: integer dtypes that hold token ids (what tokenizers return): only these get TOKEN_ID_HINT
TOKEN_ID_DTYPES = (torch.int64, torch.int32)


@dataclass(frozen=True)
class ImageField:
    """Declares a sample field an image, so that integer pixels are mixed.

    uint8 images (what PIL, image decoders and ``torchvision.io`` give) are taken as students
    without it: they are mixed in float32 and returned as float32 in ``[0, 255]``. Declare
    the field with ``ImageField`` to take the other integer dtypes too (``int16``,
    ``uint16``, ``int32``, ``int64``: those are read as token ids otherwise), or to scale
    integer pixels to ``[0, 1]``. Floating-point images are never rescaled.

    Use it wherever a field name goes in ``fields={modality: field}`` (the entry points,
    :meth:`EmbeddingBank.build <cmda_data.bank.EmbeddingBank.build>`).

    Attributes:
        key: the field: a key of dict samples or a position in tuple samples.
        scale: False (default): integer pixels become float32 with the same values (uint8:
            ``[0, 255]``). True: they are divided by ``max_value``, so that they lie in
            ``[0, 1]`` (as torchvision's ``ToDtype(torch.float32, scale=True)``).
        max_value: the value of a white pixel for ``scale=True``; None (default): the
            dtype's largest value (uint8: 255, int16: 32767, uint16: 65535).

    Examples:
        >>> ImageField("image", scale=True)
        ImageField(key='image', scale=True, max_value=None)
        >>> student_pixels(torch.tensor([0, 51, 255], dtype=torch.uint8), ImageField("x", scale=True), "x")
        tensor([0.0000, 0.2000, 1.0000])
    """

    key: Field
    scale: bool = False
    max_value: Optional[float] = None

    def __post_init__(self) -> None:
        check_field_name("ImageField.key", self.key)
        if not isinstance(self.scale, bool):
            fail("ImageField.scale", "True or False", self.scale)
        if self.max_value is not None:
            ok = isinstance(self.max_value, (int, float)) and not isinstance(self.max_value, bool) and \
                np.isfinite(self.max_value) and self.max_value > 0
            if not ok:
                fail("ImageField.max_value", "a positive finite number (or None: the dtype's largest value)",
                     self.max_value)


def field_key(field: Any) -> Any:
    """The key of a field (the :attr:`ImageField.key` of a declared image; else ``field`` itself)."""
    return field.key if isinstance(field, ImageField) else field


def image_spec(field: Any) -> Optional[ImageField]:
    """The :class:`ImageField` declaration of ``field`` (None for a plain field name)."""
    return field if isinstance(field, ImageField) else None


def check_field_name(name: str, field: Any) -> Field:
    """A field is a non-empty string (dict samples) or an integer position (tuple samples).

    An :class:`ImageField` gives its key.
    """
    field = field_key(field)
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
    fields = dict(fields or {})  # (an ImageField gives its key)
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


def is_pil_image(value: Any) -> bool:
    """Whether ``value`` is a PIL image (checked by its class, without importing PIL)."""
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in type(value).__mro__)


def pil_to_tensor(image: Any) -> torch.Tensor:
    """A PIL image as a ``[C, H, W]`` tensor of its pixels, as torchvision's ``pil_to_tensor``.

    Modes with 8-bit channels (``"RGB"``, ``"L"``, ``"RGBA"``, ...) give uint8; ``"I;16"``
    gives uint16 (int32 for ``"I"``, float32 for ``"F"``). Palette images (``"P"``) are
    converted to RGB first.
    """
    if getattr(image, "mode", None) == "P":
        image = image.convert("RGB")
    array = np.array(image)  # a copy: the tensor does not share PIL's buffer
    if array.dtype == np.bool_:  # mode "1"
        array = array.astype(np.uint8) * 255
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not np.little_endian):
        array = array.astype(array.dtype.newbyteorder("="))
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def _integer_hint(dtype: torch.dtype, field: Any) -> str:
    if dtype in TOKEN_ID_DTYPES:
        return (TOKEN_ID_HINT[:-1] + f"; if the field holds pixels, declare it an image: "
                f"fields={{...: ImageField({field!r})}})")
    return (f"a floating-point or uint8 tensor ({dtype} pixels: declare the field an image with "
            f"fields={{...: ImageField({field!r})}}, or convert them to float)")


def student_pixels(value: torch.Tensor, image: Optional[ImageField], field: Any, where: Any = None) -> torch.Tensor:
    """A student tensor (one sample or a batch) as the floating-point values that are mixed.

    Floating point: returned as it is. uint8, or any integer dtype when ``image`` declares
    the field an image: float32 (divided by ``image.max_value`` / the dtype's largest value
    when ``image.scale``). Other integer dtypes and bool raise a :class:`FieldError` whose
    hint fits the dtype (token ids only for int64/int32). ``where`` names the sample
    (None: the batch).
    """
    if value.is_floating_point():
        return value
    if value.dtype == torch.bool or value.is_complex() or (value.dtype != torch.uint8 and image is None):
        if value.dtype == torch.bool or value.is_complex():
            hint = "a floating-point tensor (or integer pixels)"
        else:
            hint = _integer_hint(value.dtype, field)
        if where is None:
            fail(f"field {field!r} of the batch", hint, value, FieldError)
        field_error(field, where, hint, value)
    out = value.to(torch.float32)
    if image is not None and image.scale:
        top = image.max_value if image.max_value is not None else float(torch.iinfo(value.dtype).max)
        out = out.div_(top)
    return out


def as_student(value: Any, field: Field, index: Any, image: Optional[ImageField] = None) -> torch.Tensor:
    """Check a student field: a floating-point tensor (numpy arrays and PIL images are converted).

    uint8 pixels (and integer ones when ``image`` declares the field an image) become
    float32 (see :func:`student_pixels`); integer tensors of other fields (token ids) raise
    a :class:`FieldError` telling to mix embeddings.
    """
    if is_pil_image(value):
        value = pil_to_tensor(value)
    elif isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        field_error(field, index, "a floating-point tensor (or a uint8 image)", value)
    if value.is_meta:
        fail(f"field {field!r} of sample {index}", "a tensor with data (cpu or cuda), not on the meta device",
             value, DeviceError)
    return student_pixels(value, image, field, index)


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
        if not -2 ** 63 <= int(value) < 2 ** 63 or (num_classes is not None and not 0 <= int(value) < num_classes):
            field_error(field, index, "a class index" + ("" if num_classes is None else
                                                        f" in [0, {num_classes}) (num_classes)"), int(value))
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
