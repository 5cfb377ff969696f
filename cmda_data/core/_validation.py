"""Argument checks shared by the public functions (private).

One message template everywhere: ``"<name>: expected <expected>, got <got>"``.
"""

from __future__ import annotations

from typing import Any, Iterable, NoReturn, Optional, Sequence, Type

import numpy as np
import torch

from ..exceptions import CMDAError, DeviceError, FieldError, ShapeError, ValidationError

__all__ = [
    "check_bool",
    "check_finite",
    "check_float_tensor",
    "check_int",
    "check_label_smoothing",
    "check_option",
    "check_positive_float",
    "check_probability",
    "check_rank",
    "check_same_size",
    "check_temperature",
    "check_tensor_data",
    "describe",
    "fail",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: the smallest temperature: below it, ``1 / temperature`` overflows float32 (and the temperature
#: itself is subnormal there, flushed to zero on some devices)
MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)


def describe(value: Any) -> str:
    """A short description of ``value`` for error messages (tensors: shape and dtype)."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype} on {value.device}"
    try:
        if isinstance(value, np.ndarray):
            return f"ndarray of shape {value.shape} and dtype {value.dtype}"
    except ImportError:  # pragma: no cover - numpy is a core dependency
        pass
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def fail(name: str, expected: str, got: Any, error: Type[CMDAError] = ValidationError, *,
         raw: bool = False) -> NoReturn:
    """Raise ``error`` with the house message template.

    Args:
        name: the argument (or field) at fault.
        expected: what was expected, in words.
        got: what was given; described with :func:`describe` unless ``raw``.
        error: the :class:`CMDAError` subclass to raise.
        raw: use ``str(got)`` as is instead of describing it.
    """
    received = str(got) if raw else describe(got)
    raise error(f"{name}: expected {expected}, got {received}")


def check_option(name: str, value: Any, options: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``options``; return it."""
    options = tuple(options)
    if value not in options:
        fail(name, "one of " + ", ".join(repr(o) for o in options), value)
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False (not 0/1, not a tensor)."""
    if not isinstance(value, bool):
        fail(name, "True or False", value)
    return value


def check_int(name: str, value: Any, *, minimum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    """Check an integer argument (``bool`` is refused); return it as ``int``."""
    if value is None and allow_none:
        return None
    check_tensor_data(name, value)
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point()
    ):
        try:
            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            what = "an integer" + (f" >= {minimum}" if minimum is not None else "")
            fail(name, what + (" or None" if allow_none else ""), value)
    value = int(value)
    if minimum is not None and value < minimum:
        fail(name, f"an integer >= {minimum}" + (" or None" if allow_none else ""), value)
    return value


def check_positive_float(name: str, value: Any, *, allow_zero: bool = False, allow_none: bool = False) -> Optional[float]:
    """Check a finite float > 0 (or >= 0 with ``allow_zero``)."""
    if value is None and allow_none:
        return None
    bound = ">= 0" if allow_zero else "> 0"
    check_tensor_data(name, value)
    if _is_complex(value):
        fail(name, f"a real, finite number {bound}", value)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        fail(name, f"a finite number {bound}", value)
    if isinstance(value, bool) or number != number or number in (float("inf"), float("-inf")):
        fail(name, f"a finite number {bound}", value)
    if number < 0 or (number == 0 and not allow_zero):
        fail(name, f"a finite number {bound}", value)
    return number


def check_temperature(name: str, value: Any, *, allow_none: bool = True) -> Optional[float]:
    """A softmax temperature: finite, ``>= MIN_TEMPERATURE`` (about 1.2e-38), so that its reciprocal is finite."""
    number = check_positive_float(name, value, allow_none=allow_none)
    if number is not None and number < MIN_TEMPERATURE:
        fail(name, f"a number >= {MIN_TEMPERATURE:.4g} (smaller temperatures have no finite reciprocal in "
             "float32)", value)
    return number


def _is_complex(value: Any) -> bool:
    """A complex number (Python, numpy or tensor): ``float()`` would drop its imaginary part."""
    return isinstance(value, (complex, np.complexfloating)) or (
        isinstance(value, (torch.Tensor, np.ndarray)) and (value.dtype.is_complex if isinstance(value, torch.Tensor)
                                                           else value.dtype.kind == "c"))


def check_probability(name: str, value: Any) -> float:
    """Check a number in [0, 1]."""
    check_tensor_data(name, value)
    if _is_complex(value):
        fail(name, "a real probability in [0, 1]", value)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        fail(name, "a probability in [0, 1]", value)
    if isinstance(value, bool) or not (0.0 <= number <= 1.0):
        fail(name, "a probability in [0, 1]", value)
    return number


def check_label_smoothing(name: str, value: Any) -> float:
    """``eps`` of label smoothing: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        fail(name, "a number in [0, 1)", value)
    return float(value)


def check_float_tensor(name: str, value: Any, *, finite: bool = True) -> torch.Tensor:
    """Check that ``value`` is a floating-point tensor (and finite unless told otherwise)."""
    if not isinstance(value, torch.Tensor):
        fail(name, "a floating-point torch.Tensor", value)
    if value.dtype not in FLOAT_DTYPES:
        fail(name, "a floating-point tensor (float16, bfloat16, float32 or float64)", value)
    check_tensor_data(name, value)
    if finite:
        check_finite(name, value)
    return value


def check_finite(name: str, value: torch.Tensor) -> torch.Tensor:
    """Refuse NaN and infinite entries."""
    check_tensor_data(name, value)
    if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        fail(name, "finite values (no NaN or inf)", f"{bad} non-finite entries in {describe(value)}", raw=True)
    return value


def check_rank(name: str, value: torch.Tensor, ndim: int | Sequence[int]) -> torch.Tensor:
    """Check the number of dimensions of a tensor."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    check_tensor_data(name, value)
    if value.ndim not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        fail(name, f"a {want} tensor", value, ShapeError)
    return value


def check_tensor_data(name: str, value: Any) -> Any:
    """Refuse tensors without data (the ``meta`` device): nothing can be read from them."""
    if isinstance(value, torch.Tensor) and value.is_meta:
        fail(name, "a tensor with data (cpu or cuda), not on the meta device", value, DeviceError)
    return value


def check_same_size(name_a: str, size_a: int, name_b: str, size_b: int, *, what: str = "size") -> None:
    """Check that two sizes agree; name both arguments in the message."""
    if size_a != size_b:
        fail(name_b, f"{what} {size_a} to match {name_a}", f"{what} {size_b}", ShapeError, raw=True)


def field_error(field: Any, index: Any, expected: str, got: Any) -> NoReturn:
    """Raise :class:`FieldError` naming the sample field and the sample index."""
    fail(f"field {field!r} of sample {index}", expected, got, FieldError)
