"""Hugging Face ``datasets`` as input (private): recognise its objects and turn columns into batches.

``datasets`` stays optional: nothing here imports it. An object can only be a ``datasets``
object when the user has imported ``datasets``, so the checks look the classes up in
``sys.modules``. The conversions are plain Python and torch:

* a ``Column`` (what ``ds["text"]`` returns in datasets >= 4) is a lazy sequence: it is read
  as a list (or read row by row by index, without decoding the whole column);
* a column of PIL images stays a list of images: the aligner converts them with its own
  preprocessing (:meth:`cmda_data.aligners.Aligner.preprocess_image`); a column of strings
  stays a list of strings;
* numbers, numpy arrays and tensors (also what ``with_format("torch")`` gives) are stacked
  with ``default_collate``; values that cannot be stacked raise a :class:`FieldError`
  naming the field instead of the ``TypeError`` of ``default_collate``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, Dict, Iterator, List

import torch
from torch.utils.data import default_collate

from ..core._fields import is_pil_image
from ..core._validation import fail
from ..exceptions import FieldError

__all__ = ["RowList", "StreamBatches", "collate_columns", "column_values", "is_hf_column", "is_hf_dataset",
           "is_hf_iterable", "is_stream", "is_value_column", "iter_chunks", "read_rows", "to_batch"]


def _hf_class(module: str, name: str) -> Any:
    """The class ``datasets.<module>.<name>`` if ``datasets`` is imported, else None."""
    found = sys.modules.get(f"datasets.{module}")
    return getattr(found, name, None) if found is not None else None


def _isinstance(obj: Any, module: str, name: str) -> bool:
    cls = _hf_class(module, name)
    return cls is not None and isinstance(obj, cls)


def is_hf_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a map-style ``datasets.Dataset``."""
    return _isinstance(obj, "arrow_dataset", "Dataset")


def is_hf_iterable(obj: Any) -> bool:
    """Whether ``obj`` is a streaming ``datasets.IterableDataset``."""
    return _isinstance(obj, "iterable_dataset", "IterableDataset")


def is_hf_column(obj: Any) -> bool:
    """Whether ``obj`` is a ``datasets`` column (``ds["text"]``: ``Column`` or ``IterableColumn``)."""
    return _isinstance(obj, "arrow_dataset", "Column") or _isinstance(obj, "iterable_dataset", "IterableColumn")


def is_stream(obj: Any) -> bool:
    """Whether ``obj`` is read by iterating (a streaming ``datasets.IterableDataset`` or a torch
    ``IterableDataset``) rather than by index."""
    return is_hf_iterable(obj) or isinstance(obj, torch.utils.data.IterableDataset)


def column_values(value: Any) -> Any:
    """A ``datasets`` column as a list (anything else unchanged)."""
    return list(value) if is_hf_column(value) else value


def read_rows(dataset: Any, indices: List[int]) -> Dict[str, Any]:
    """Rows ``indices`` of a map-style ``datasets.Dataset`` as ``{column: values}`` (one batched read)."""
    rows = dataset[indices]
    if not isinstance(rows, Mapping):  # (a custom format can return anything)
        fail("dataset", "a datasets.Dataset whose rows are dicts of columns", rows)
    return {key: column_values(value) for key, value in rows.items()}


def to_batch(values: Any, field: Any) -> Any:
    """One field of a batch of samples, as the aligner takes it.

    PIL images and strings stay a list; a tensor (a ``with_format("torch")`` column) stays as
    it is; other values are stacked with ``default_collate``. Values that cannot be stacked
    (mixed types, tensors of different shapes, unknown objects) raise a :class:`FieldError`.
    """
    values = column_values(values)
    if isinstance(values, torch.Tensor):
        return values
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        fail(f"field {field!r} of the batch", "one value per sample", values, FieldError)
    if values and all(is_pil_image(v) for v in values):
        return list(values)
    if values and all(isinstance(v, str) for v in values):
        return list(values)
    try:
        return default_collate(list(values))
    except (TypeError, RuntimeError) as error:
        kinds = sorted({type(v).__name__ for v in values})
        shapes = sorted({tuple(v.shape) for v in values if hasattr(v, "shape")})
        got = f"values of type {', '.join(kinds)}" + (f" and shapes {', '.join(map(str, shapes[:4]))}" if len(shapes) > 1 else "")
        hint = ("values of one shape (resize the images, e.g. with dataset.with_transform(...), or use an aligner "
                "whose preprocess_image resizes them)" if len(shapes) > 1 else
                "tensors, numbers, numpy arrays, strings or PIL images (values default_collate can stack)")
        fail(f"field {field!r} of the batch", hint, f"{got} ({type(error).__name__}: {error})", FieldError, raw=True)


def collate_columns(samples: List[Any]) -> Any:
    """A ``collate_fn`` for dict samples whose columns may hold PIL images or strings.

    Every key goes through :func:`to_batch` (PIL images and strings stay lists); other
    samples go to ``default_collate``. Used to train an aligner on a ``datasets.Dataset``.
    """
    if samples and all(isinstance(s, Mapping) for s in samples):
        return {key: to_batch([s[key] for s in samples], key) for key in samples[0]}
    return default_collate(samples)


def iter_chunks(stream: Any, size: int) -> Iterator[List[Any]]:
    """Lists of ``size`` consecutive samples of an iterable (the last one shorter)."""
    chunk: List[Any] = []
    for sample in stream:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class StreamBatches:
    """Dict batches of ``batch_size`` samples of a stream (re-iterable: one pass per ``iter``).

    Every column goes through :func:`to_batch` (PIL images and strings stay lists).
    """

    def __init__(self, stream: Any, batch_size: int) -> None:
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self) -> Iterator[Any]:
        for chunk in iter_chunks(self.stream, self.batch_size):
            yield collate_columns(chunk)


class RowList:
    """A column of Python values (a ``datasets`` column, a list of strings or PIL images) that
    can be sliced by a tensor of row numbers like a tensor column (``column[rows]``: a list)."""

    device = torch.device("cpu")

    def __init__(self, values: Any) -> None:
        self.values = values
        self.shape = (len(values),)
        self.ndim = 1

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> List[Any]:
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        return [self.values[i] for i in rows]


def is_value_column(value: Any) -> bool:
    """Whether ``value`` is a column of Python values: a ``datasets`` column, or a list/tuple of
    strings or PIL images."""
    if is_hf_column(value):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and (
        all(isinstance(v, str) for v in value) or all(is_pil_image(v) for v in value))
