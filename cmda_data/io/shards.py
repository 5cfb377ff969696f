"""webdataset shards: :func:`write_shards` and :func:`read_shards` (nothing read is executed).

webdataset is an optional extra: it is imported inside the functions that need it, so
``import cmda_data.io.shards`` works without it.

* :func:`write_shards` -- a dataset or iterable of dict samples to tar shards; tensors as
  ``.npy`` (never pickle), ints ``.cls``, strings ``.txt``, the rest ``.json``, and the
  sample's dataset index as ``index.cls`` so a bank row can be looked up.
* :func:`read_shards` -- shards back to samples through a
  :class:`~cmda_data.io.codec.SafeDecoder` (``.pyd``, ``.pickle``, ``.pth`` ... members are
  dropped and counted, never unpickled) and a :class:`~cmda_data.io.codec.SkipCounter`
  (corrupt members, samples or shards are skipped, counted and reported once).
* :class:`~cmda_data.CMDACollate` is a ``collation_fn`` of ``wds.batched`` as it is, and
  :class:`~cmda_data.CandidateBuffer` a pipeline stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

from torch.utils.data import IterableDataset

from ..core._fields import as_index, get_field
from ..core._validation import check_int, fail
from ..exceptions import MissingDependencyError
from .codec import UNSAFE_EXTENSIONS, SafeDecoder, SkipCounter, encode_field

__all__ = ["read_shards", "write_shards"]


def _wds() -> Any:
    """Import webdataset, or raise the error that names the pip extra."""
    try:
        import webdataset
    except ImportError as error:
        fail("webdataset", "the optional dependency 'webdataset' (pip install -e '.[webdataset]')",
             repr(error), MissingDependencyError, raw=True)
    return webdataset


# --------------------------------------------------------------------------- writing
def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name or "." in name or "/" in name or name.startswith("_"):
        fail(what, "a field name without '.', '/' or a leading '_' (member names are <key>.<field>.<ext>)",
             name)
    return name


def _iter_samples(samples: Any, index_field: str) -> Iterator[tuple]:
    """``(dataset index, sample)``: map-style datasets by position, iterables in order."""
    if hasattr(samples, "__getitem__") and hasattr(samples, "__len__") and not isinstance(
            samples, (IterableDataset, str, bytes, Mapping)):
        for position in range(len(samples)):
            yield position, samples[position]
        return
    if isinstance(samples, (str, bytes, Mapping)) or not isinstance(samples, Iterable):
        fail("samples", "a map-style dataset or an iterable of samples", samples)
    for position, sample in enumerate(samples):
        carried = sample.get(index_field) if isinstance(sample, Mapping) else None
        yield (position if carried is None else carried), sample


def write_shards(samples: Any, pattern: str, *, maxcount: int = 1000, maxsize: float = 3e9,
                 fields: Optional[Mapping[str, Optional[str]]] = None,
                 encoders: Optional[Mapping[str, Callable[[Any], bytes]]] = None,
                 names: Optional[Sequence[str]] = None, index_field: str = "index") -> List[str]:
    """Write samples to webdataset tar shards (no pickle); return the shard paths.

    Sample ``t`` (in iteration order) becomes the members ``{t:09d}.<field>.<ext>`` plus
    ``{t:09d}.<index_field>.cls``: its dataset index (its position in a map-style dataset,
    or the value of its ``index_field`` when the sample carries one, as samples of
    :class:`~cmda_data.IndexedDataset` do). :class:`SafeDecoder` reads the index back as
    the field ``index_field``, which :class:`CandidateBuffer` and
    :class:`~cmda_data.CMDACollate` use to look up bank rows.

    Args:
        samples: a map-style dataset (read by position) or an iterable of samples. Samples
            are dicts, or tuples with ``names``.
        pattern: shard path with a printf field, e.g. ``"shards/train-%06d.tar"``.
        maxcount: samples per shard; maxsize: bytes per shard.
        fields: the fields to write, each with its extension (None: chosen by type). Default:
            every field, extensions by type (tensor/array ``npy``, int ``cls``, str ``txt``,
            float/bool/list/dict ``json``).
        encoders: extension -> ``value -> bytes`` for other formats (e.g. ``"png"``).
            Pickle-based extensions (``pyd``, ``pickle``, ``pth``, ...) are refused.
        names: field names of the positions of tuple samples.
        index_field: name of the dataset-index member.

    Examples:
        >>> import os, tempfile
        >>> import torch
        >>> data = [{"image": torch.full((2,), float(i)), "label": i % 2} for i in range(5)]
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     paths = write_shards(data, os.path.join(folder, "s-%02d.tar"), maxcount=3)
        ...     names = [os.path.basename(p) for p in paths]
        >>> names
        ['s-00.tar', 's-01.tar']
    """
    wds = _wds()
    maxcount = check_int("maxcount", maxcount, minimum=1)
    index_field = _check_name(index_field, "index_field")
    if not isinstance(pattern, str):
        fail("pattern", "a path with a printf field such as 'train-%06d.tar'", pattern)
    try:
        pattern % 0
    except (TypeError, ValueError):
        fail("pattern", "a path with one printf field such as 'train-%06d.tar'", pattern)
    wanted = None if fields is None else {_check_name(k, "fields"): v for k, v in dict(fields).items()}
    for ext in list((wanted or {}).values()) + list(encoders or {}):
        if ext in UNSAFE_EXTENSIONS:
            fail("fields/encoders", "no pickle-based extension", f".{ext}", raw=True)
    written: List[str] = []
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, encoder=False,
                         post=written.append, mtime=0.0) as sink:
        for position, (index, sample) in enumerate(_iter_samples(samples, index_field)):
            if not isinstance(sample, Mapping):
                if names is None or not isinstance(sample, (tuple, list)) or len(names) != len(sample):
                    fail(f"sample {index}", "a dict, or a tuple with names= for its positions", sample)
                sample = dict(zip(names, sample))
            index = as_index(index, index_field, str(position),
                             "or no such field: map-style datasets use the position")
            record: Dict[str, Any] = {"__key__": f"{position:09d}",
                                      f"{index_field}.cls": str(int(index)).encode("ascii")}
            chosen = wanted if wanted is not None else {k: None for k in sample}
            for name, ext in chosen.items():
                if name == index_field:
                    continue
                _check_name(name, f"field {name!r} of sample {index}")
                value = get_field(sample, name, index)
                ext, data = encode_field(name, value, ext, encoders)
                record[f"{name}.{ext}"] = data
            sink.write(record)
    return written


# --------------------------------------------------------------------------- reading
def read_shards(urls: Union[str, Sequence[str]], *, decoder: Optional[SafeDecoder] = None,
                counter: Optional[SkipCounter] = None, strict: bool = False,
                split_by_node: bool = False, split_by_worker: bool = True,
                required: Union[str, Sequence[str], None] = "consistent") -> Any:
    """A ``wds.DataPipeline`` of decoded samples from tar shards (never unpickles).

    Stages: shard list (``urls``: a list or a brace pattern such as
    ``"train-{000000..000009}.tar"``), optional ``wds.split_by_node``,
    ``wds.split_by_worker``, ``wds.tarfile_to_samples``, the ``decoder``, and a final stage
    that warns once with the number of skipped items. Append more stages with
    ``pipeline.append(...)`` (e.g. :func:`cmda_mix`, ``wds.batched(B, collation_fn=collate)``).

    Args:
        urls: shard paths or a brace pattern.
        decoder: default ``SafeDecoder(counter=counter, required=required)``.
        counter: where skips are counted (default: a new :class:`SkipCounter`, available as
            ``pipeline.skip_counter``).
        strict: raise on the first corrupt shard or member instead of skipping it.
        split_by_node: give each distributed rank its own shards.
        split_by_worker: give each DataLoader worker its own shards.
        required: see :class:`SafeDecoder` (used when ``decoder`` is None). The default
            skips samples that lack a field of the first sample of their shard, e.g. the
            incomplete last sample of a truncated shard (tar streams end silently).
    """
    wds = _wds()
    for name, flag in (("strict", strict), ("split_by_node", split_by_node), ("split_by_worker", split_by_worker)):
        if not isinstance(flag, bool):
            fail(name, "True or False", flag)
    counter = SkipCounter() if counter is None else counter
    decoder = SafeDecoder(counter=counter, required=required) if decoder is None else decoder
    if not callable(decoder):
        fail("decoder", "a SafeDecoder (or a callable sample -> sample)", decoder)
    handler = wds.reraise_exception if strict else counter
    stages: List[Any] = [wds.SimpleShardList(urls if isinstance(urls, str) else list(urls))]
    if split_by_node:
        stages.append(wds.split_by_node)
    if split_by_worker:
        stages.append(wds.split_by_worker)
    stages += [wds.tarfile_to_samples(handler=handler), wds.map(decoder, handler=handler),
               counter.report_at_end]
    pipeline = wds.DataPipeline(*stages)
    pipeline.skip_counter = counter
    return pipeline


# --------------------------------------------------------------------------- mixing
