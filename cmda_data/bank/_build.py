"""Embedding a whole dataset with an aligner, in batches (private; used by EmbeddingBank.build).

The dataset is a map-style dataset (read by index), a Hugging Face ``datasets.Dataset`` (read
a batch of rows at a time) or a stream (a ``datasets.IterableDataset`` or a torch
``IterableDataset``: row ``r`` of the bank is the ``r``-th sample of the stream). Each field of
a batch reaches ``aligner.embed`` as :func:`cmda_data.io._hf.to_batch` makes it: PIL images
and strings as lists (the aligner preprocesses them), everything else stacked.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..aligners.precomputed import PrecomputedAligner
from ..core._fields import get_field, resolve_fields
from ..core._validation import check_int, describe, fail
from ..exceptions import FieldError, ShapeError, ValidationError
from ..io._hf import is_hf_dataset, is_stream, iter_chunks, read_rows, to_batch

__all__ = ["embed_dataset", "embedded_chunks", "embeds_by_index"]


def embeds_by_index(aligner: Any) -> bool:
    """Whether ``aligner.embed(modality, batch)`` takes dataset indices instead of field values.

    True for :class:`~cmda_data.aligners.PrecomputedAligner` and for any aligner with a
    true ``embeds_by_index`` attribute.
    """
    flag = getattr(aligner, "embeds_by_index", None)
    if flag is not None:
        return bool(flag)
    return isinstance(aligner, PrecomputedAligner)


def aligner_device(aligner: Any) -> torch.device:
    """The device of the aligner's first parameter or buffer (CPU when it has none)."""
    if isinstance(aligner, torch.nn.Module):
        for tensor in list(aligner.parameters()) + list(aligner.buffers()):
            return tensor.device
    return torch.device("cpu")


def move(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(v, device) for v in batch) if isinstance(batch, list) else tuple(
            move(v, device) for v in batch)
    return batch


def check_indices(indices: Optional[Iterable[int]], length: int) -> Optional[List[int]]:
    """Validate the dataset indices to embed: unique integers in [0, len(dataset))."""
    if indices is None:
        return None
    if isinstance(indices, torch.Tensor):
        indices = indices.reshape(-1).tolist()
    values = [check_int("indices", i, minimum=0) for i in indices]
    if not values:
        fail("indices", "at least one dataset index", indices)
    bad = [i for i in values if i >= length]
    if bad:
        fail("indices", f"dataset indices in [0, {length})", bad[0])
    if len(set(values)) != len(values):
        fail("indices", "unique dataset indices", describe(values), raw=True)
    return sorted(values)


def embedded_chunks(dataset: Any, aligner: Any, modalities: Sequence[str], *,
                    fields: Optional[Mapping[str, Union[str, int]]], batch_size: int,
                    device: Optional[Union[str, torch.device]], progress: bool, indices: Optional[Iterable[int]]
                    ) -> Tuple[Iterator[Tuple[int, Dict[str, torch.Tensor]]], Optional[List[int]], Optional[int]]:
    """``(chunks, indices, total)``: the arguments are checked now, the embedding runs as ``chunks`` is read.

    ``chunks`` yields ``(rows, {modality: float32 CPU [rows, d]})`` batch by batch (the shapes
    checked: same ``d`` in every batch); ``indices`` are the sorted dataset indices embedded
    (None: all of them, in order) and ``total`` the number of rows (None for a stream).
    """
    if not callable(getattr(aligner, "embed", None)):
        fail("aligner", "an object with embed(modality, batch) (see cmda_data.aligners)", aligner)
    known = getattr(aligner, "modalities", None)
    if known is not None:
        for modality in modalities:
            if modality not in known:
                fail("aligner", f"an aligner that knows modality {modality!r}",
                     f"modalities {tuple(known)}", ValidationError, raw=True)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    field_of = resolve_fields(modalities, fields)
    by_index = embeds_by_index(aligner)
    if is_stream(dataset):
        if indices is not None:
            fail("indices", "None for a streaming dataset (its rows are read in order; shard it with "
                 "datasets.distributed.split_dataset_by_node instead)", indices)
        if by_index:
            fail("aligner", "an aligner that embeds field values (a streaming dataset has no indices to look up)",
                 aligner)
        chunks: Iterator[Tuple[List[int], Dict[str, Any]]] = _stream_chunks(dataset, field_of, batch_size)
        chosen, total = None, None
    else:
        try:
            length = len(dataset)
        except TypeError:
            fail("dataset", "a map-style dataset with __len__ and __getitem__ (or a streaming IterableDataset)",
                 dataset)
        chosen = check_indices(indices, length)
        order = chosen if chosen is not None else range(length)
        if not len(order):
            fail("dataset", "at least one sample", "an empty dataset", raw=True)
        chunks, total = _index_chunks(dataset, order, field_of, batch_size, by_index), len(order)
    target = torch.device(device) if device is not None else aligner_device(aligner)
    return _embed(_progress(chunks, progress, total, batch_size), aligner, modalities, by_index, target), chosen, total


def _embed(chunks: Iterable[Tuple[List[int], Dict[str, Any]]], aligner: Any, modalities: Sequence[str],
           by_index: bool, target: torch.device) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
    width: Dict[str, int] = {}
    for chunk, columns in chunks:
        out = {}
        for modality in modalities:
            batch: Any = torch.tensor(chunk, dtype=torch.long) if by_index else columns[modality]
            z = aligner.embed(modality, move(batch, target))
            if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != len(chunk) or (
                    modality in width and z.shape[1] != width[modality]):
                fail(f"aligner.embed({modality!r}, batch of {len(chunk)})",
                     f"a [{len(chunk)}, {width.get(modality, 'd')}] tensor", z, ShapeError)
            width[modality] = z.shape[1]
            out[modality] = z.detach().to("cpu", torch.float32)
        yield len(chunk), out


def embed_dataset(dataset: Any, aligner: Any, modalities: Sequence[str], *,
                  fields: Optional[Mapping[str, Union[str, int]]], batch_size: int,
                  device: Optional[Union[str, torch.device]], progress: bool,
                  indices: Optional[Iterable[int]]) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Embed ``modalities`` of every sample (or of ``indices``); returns (embeddings, indices)."""
    chunks, chosen, total = embedded_chunks(dataset, aligner, modalities, fields=fields, batch_size=batch_size,
                                            device=device, progress=progress, indices=indices)
    # known length: one [total, d] float32 table per modality, filled batch by batch (a list + one
    # concatenation would hold every embedding twice). The copy goes through numpy: one memcpy, where
    # torch's parallel copy costs milliseconds per batch when the cores are busy. A stream of unknown
    # length keeps its batches.
    parts: Dict[str, List[torch.Tensor]] = {m: [] for m in modalities}
    tables: Dict[str, np.ndarray] = {}
    done = 0
    for rows, batch in chunks:
        for modality, z in batch.items():
            if total is None:
                parts[modality].append(z)
                continue
            if modality not in tables:
                tables[modality] = np.empty((total, z.shape[1]), dtype=np.float32)
            tables[modality][done:done + rows] = z.numpy()
        done += rows
    held = None if chosen is None else torch.tensor(chosen, dtype=torch.long)
    if total is not None:
        return {m: torch.from_numpy(t) for m, t in tables.items()}, held
    if not parts[modalities[0]]:
        fail("dataset", "at least one sample", "an empty stream", raw=True)
    return {m: torch.cat(p) for m, p in parts.items()}, held


def _columns(samples: List[Any], chunk: List[int], field_of: Mapping[str, Any]) -> Dict[str, Any]:
    """``{modality: batch}`` of the samples (dataset indices ``chunk``), each field through :func:`to_batch`."""
    return {m: to_batch([get_field(s, f, i) for s, i in zip(samples, chunk)], f) for m, f in field_of.items()}


def _index_chunks(dataset: Any, order: Sequence[int], field_of: Mapping[str, Any], batch_size: int,
                  by_index: bool) -> Iterator[Tuple[List[int], Dict[str, Any]]]:
    """``(dataset indices, {modality: batch})`` per batch of a map-style dataset."""
    hf = is_hf_dataset(dataset)
    for start in range(0, len(order), batch_size):
        chunk = list(order[start:start + batch_size])
        if by_index:
            yield chunk, {}
        elif hf:  # one batched read of the rows; its columns are the fields
            rows = read_rows(dataset, chunk)
            for modality, field in field_of.items():
                if field not in rows:
                    fail(f"fields[{modality!r}]", "a column of the dataset (" + ", ".join(map(repr, rows)) + ")",
                         field, FieldError)
            yield chunk, {m: to_batch(rows[f], f) for m, f in field_of.items()}
        else:
            yield chunk, _columns([dataset[i] for i in chunk], chunk, field_of)


def _stream_chunks(stream: Any, field_of: Mapping[str, Any], batch_size: int
                   ) -> Iterator[Tuple[List[int], Dict[str, Any]]]:
    """``(row numbers, {modality: batch})`` per batch of a stream (rows numbered in stream order)."""
    seen = 0
    for samples in iter_chunks(stream, batch_size):
        chunk = list(range(seen, seen + len(samples)))
        seen += len(samples)
        yield chunk, _columns(samples, chunk, field_of)


def _progress(iterable: Any, enabled: bool, total: Optional[int], batch_size: int) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return iterable
    batches = None if total is None else (total + batch_size - 1) // batch_size
    return tqdm(iterable, desc="embedding", unit="batch", total=batches)
