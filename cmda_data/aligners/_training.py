"""Batch iteration and small helpers for ``fit`` (private).

``fit`` accepts three kinds of data:

* a ``torch.utils.data.DataLoader`` (or any iterable of dict batches that is not a
  dataset): used as it is;
* a mapping of equally long tensors / arrays ``{"image": X, "text": T, "label": y}``:
  batches are sliced directly (fast, no collate);
* a map-style dataset (``__getitem__`` + ``__len__``) whose samples are dicts: wrapped
  in a ``DataLoader`` with ``default_collate`` and an explicit generator;
* Hugging Face ``datasets``: a ``Dataset`` (a DataLoader whose collate keeps PIL images and
  strings as lists: the aligner preprocesses them), an ``IterableDataset`` (read in order,
  ``batch_size`` samples at a time), and ``datasets`` columns or lists of strings / PIL
  images as the values of the mapping.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..core._validation import fail
from ..exceptions import FieldError, ShapeError, ValidationError
from ..io._hf import RowList, StreamBatches, collate_columns, is_hf_dataset, is_hf_iterable, is_value_column

__all__ = ["batch_size_of", "check_batch", "check_finite_loss", "make_batches", "move_to", "progress_bar"]


class _TensorDictBatches:
    """Shuffled slices of a mapping of tensors; a fresh permutation every pass."""

    def __init__(self, columns: Mapping[str, torch.Tensor], batch_size: int, shuffle: bool,
                 generator: torch.Generator) -> None:
        self.columns = dict(columns)
        self.n = next(iter(self.columns.values())).shape[0]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            rows = order[start:start + self.batch_size]
            yield {key: value[rows.to(value.device)] for key, value in self.columns.items()}


def _as_column(name: str, value: Any) -> Any:
    if is_value_column(value):  # strings, PIL images, a datasets column: sliced as a list
        return RowList(value)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        fail(f"data[{name!r}]", "a tensor or numpy array (one row per sample), a datasets column or a list of "
             "strings or PIL images", value)
    if value.ndim == 0:
        fail(f"data[{name!r}]", "a tensor with one row per sample", value, ShapeError)
    return value


def make_batches(data: Any, *, batch_size: int, shuffle: bool, num_workers: int,
                 generator: torch.Generator) -> Any:
    """An iterable of dict batches (re-iterable once per epoch) for ``data``."""
    if isinstance(data, DataLoader):
        return data
    if is_hf_iterable(data):
        return StreamBatches(data, batch_size)
    if is_hf_dataset(data):
        if len(data) == 0:
            fail("data", "a non-empty dataset", data)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                          generator=generator, drop_last=False, collate_fn=collate_columns)
    if isinstance(data, Mapping):
        if not data:
            fail("data", "a non-empty mapping of tensors", data)
        columns = {key: _as_column(key, value) for key, value in data.items()}
        sizes = {key: value.shape[0] for key, value in columns.items()}
        if len(set(sizes.values())) != 1:
            fail("data", "columns with the same number of rows", sizes, ShapeError, raw=True)
        return _TensorDictBatches(columns, batch_size, shuffle, generator)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            fail("data", "a non-empty dataset", data)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                          generator=generator, drop_last=False)
    if hasattr(data, "__iter__"):
        return data
    fail("data", "a DataLoader, a dataset of dict samples (or a datasets.Dataset) or a mapping of tensors", data)


def batch_size_of(batch: Mapping[str, Any], field: str) -> int:
    value = batch[field]
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.ndim else 1
    try:
        return len(value)
    except TypeError:
        return 1


def check_batch(batch: Any, fields: Mapping[str, str], target: Optional[str]) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping):
        fail("batch", "a dict batch with the fields " + ", ".join(repr(f) for f in fields.values()), batch,
             FieldError)
    needed = list(fields.values()) + ([target] if target is not None else [])
    for field in needed:
        if field not in batch:
            fail(f"batch field {field!r}", "present (fields: " + ", ".join(map(repr, needed)) + ")",
                 "a batch with keys " + ", ".join(map(repr, batch)), FieldError, raw=True)
    return batch


def move_to(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside dicts / lists) to ``device``; leave other values alone."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: move_to(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(move_to(v, device) for v in value)
    return value


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar, or a silent stand-in when disabled or tqdm is missing."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, leave=False)
        except ImportError:  # pragma: no cover - tqdm ships with the bench extra
            pass
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def check_finite_loss(loss: Optional[torch.Tensor], latents: Mapping[str, torch.Tensor], epoch: int, step: int
                      ) -> None:
    """Stop training with a clear message once latents or the loss stop being finite."""
    expected = "a finite value (training diverged: lower lr, or check the inputs for extreme values)"
    for name, z in latents.items():
        if not bool(torch.isfinite(z.detach()).all()):
            fail("training loss", expected, f"non-finite latents of {name!r} at epoch {epoch}, batch {step}",
                 ValidationError, raw=True)
    if loss is not None and not bool(torch.isfinite(loss.detach())):
        fail("training loss", expected, f"{loss.item()} at epoch {epoch}, batch {step}", ValidationError, raw=True)
