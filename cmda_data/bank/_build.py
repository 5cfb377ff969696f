"""Embedding a whole dataset with an aligner, in batches (private; used by EmbeddingBank.build)."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import default_collate

from ..aligners.precomputed import PrecomputedAligner
from ..core._fields import get_field, resolve_fields
from ..core._validation import check_int, describe, fail
from ..exceptions import ShapeError, ValidationError

__all__ = ["embed_dataset", "embeds_by_index"]


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


def embed_dataset(dataset: Any, aligner: Any, modalities: Sequence[str], *,
                  fields: Optional[Mapping[str, Union[str, int]]], batch_size: int,
                  device: Optional[Union[str, torch.device]], progress: bool,
                  indices: Optional[Iterable[int]]) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Embed ``modalities`` of every sample (or of ``indices``); returns (embeddings, indices)."""
    if not callable(getattr(aligner, "embed", None)):
        fail("aligner", "an object with embed(modality, batch) (see cmda_data.aligners)", aligner)
    known = getattr(aligner, "modalities", None)
    if known is not None:
        for modality in modalities:
            if modality not in known:
                fail("aligner", f"an aligner that knows modality {modality!r}",
                     f"modalities {tuple(known)}", ValidationError, raw=True)
    try:
        length = len(dataset)
    except TypeError:
        fail("dataset", "a map-style dataset with __len__ and __getitem__", dataset)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    chosen = check_indices(indices, length)
    order = chosen if chosen is not None else range(length)
    if not len(order):
        fail("dataset", "at least one sample", "an empty dataset", raw=True)
    target = torch.device(device) if device is not None else aligner_device(aligner)
    field_of = resolve_fields(modalities, fields)
    by_index = embeds_by_index(aligner)
    parts: Dict[str, List[torch.Tensor]] = {m: [] for m in modalities}
    starts = range(0, len(order), batch_size)
    bar = _progress(starts, progress, len(order), batch_size)
    for start in bar:
        chunk = list(order[start:start + batch_size])
        samples = None if by_index else [dataset[i] for i in chunk]
        for modality in modalities:
            if by_index:
                batch: Any = torch.tensor(chunk, dtype=torch.long)
            else:
                batch = default_collate([get_field(s, field_of[modality], i) for s, i in zip(samples, chunk)])
            z = aligner.embed(modality, move(batch, target))
            if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != len(chunk):
                fail(f"aligner.embed({modality!r}, batch of {len(chunk)})", f"a [{len(chunk)}, d] tensor", z,
                     ShapeError)
            parts[modality].append(z.detach().float().cpu())
    embeddings = {m: torch.cat(p) for m, p in parts.items()}
    return embeddings, None if chosen is None else torch.tensor(chosen, dtype=torch.long)


def _progress(iterable: Any, enabled: bool, total: int, batch_size: int) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return iterable
    return tqdm(iterable, desc="embedding", unit="batch", total=(total + batch_size - 1) // batch_size)
