"""webdataset shards: :func:`write_shards` and :func:`read_shards` (nothing read is executed).

webdataset is an optional extra: it is imported inside the functions that need it, so
``import cmda_data.io.shards`` works without it.

* :func:`write_shards` -- a dataset or iterable of dict samples to tar shards; tensors as
  ``.npy`` (never pickle), ints ``.cls``, strings ``.txt``, the rest ``.json``, and the
  sample's dataset index as ``index.cls`` so a bank row can be looked up. Beside each local
  shard it writes a manifest ``<shard>.manifest.json``: how many samples the shard holds,
  the fields every one of them has and the shard's size in bytes.
* :func:`read_shards` -- shards back to samples through a
  :class:`~cmda_data.io.codec.SafeDecoder` (``.pyd``, ``.pickle``, ``.pth`` ... members are
  dropped and counted, never unpickled). Each shard is checked against its manifest: a
  shard cut short anywhere, or a sample that lacks a field, is a counted skip
  (:class:`~cmda_data.io.codec.SkipCounter`, reported once) or, with ``strict=True``, a
  :class:`~cmda_data.ValidationError`; never a silent loss. Required fields come from the
  manifest or from ``required=``, never from a sample.
* Only local paths and ``file:`` URLs are opened: ``pipe:`` (a shell command), ``http:``,
  ``s3:`` ... URLs are refused unless the caller passes ``allow_pipe=True``.
* :class:`~cmda_data.CMDACollate` is a ``collation_fn`` of ``wds.batched`` as it is, and
  :class:`~cmda_data.CandidateBuffer` a pipeline stage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Optional,
    Union,
)

from torch.utils.data import IterableDataset

from ..core._fields import as_index, get_field
from ..core._validation import check_int, fail
from ..exceptions import CMDAError, MissingDependencyError, ValidationError
from ._tar import (
    MANIFEST_SUFFIX,
    field_of,
    local_path,
    raw_samples,
    read_manifest,
    write_manifest,
)
from .codec import UNSAFE_EXTENSIONS, SafeDecoder, SkipCounter, encode_field

__all__ = ["MANIFEST_SUFFIX", "read_manifest", "read_shards", "write_shards"]


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


class _Shards:
    """What :func:`write_shards` wrote: per shard the sample count and the fields all samples have."""

    def __init__(self, local: bool) -> None:
        self.local = local
        self.paths: List[str] = []
        self.files: Dict[str, IO[bytes]] = {}
        self.counts: Dict[str, List[Any]] = {}

    def open(self, path: str) -> IO[bytes]:  # ShardWriter's opener: no gopen, no URL rewriting
        self.files[path] = stream = open(path, "wb")
        return stream

    def add(self, path: str, record: Mapping[str, Any]) -> None:
        names = frozenset(field_of(k) for k in record if not k.startswith("__"))
        entry = self.counts.setdefault(path, [0, names])
        entry[0] += 1
        entry[1] &= names

    def finished(self, path: str) -> None:  # ShardWriter's post: the tar is complete
        self.paths.append(path)
        if self.local:
            self.files.pop(path).close()
            count, fields = self.counts.get(path, (0, frozenset()))
            write_manifest(path, count, fields)


def write_shards(samples: Any, pattern: str, *, maxcount: int = 1000, maxsize: float = 3e9,
                 fields: Optional[Mapping[str, Optional[str]]] = None,
                 encoders: Optional[Mapping[str, Callable[[Any], bytes]]] = None,
                 names: Optional[Sequence[str]] = None, index_field: str = "index",
                 allow_pipe: bool = False) -> List[str]:
    """Write samples to webdataset tar shards (no pickle) and their manifests; return the shard paths.

    Sample ``t`` (in iteration order) becomes the members ``{t:09d}.<field>.<ext>`` plus
    ``{t:09d}.<index_field>.cls``: its dataset index (its position in a map-style dataset,
    or the value of its ``index_field`` when the sample carries one, as samples of
    :class:`~cmda_data.IndexedDataset` do). :class:`SafeDecoder` reads the index back as
    the field ``index_field``, which :class:`CandidateBuffer` and
    :class:`~cmda_data.CMDACollate` use to look up bank rows.

    Beside each shard ``p`` the manifest ``p + ".manifest.json"`` records the number of
    samples, the fields every sample of the shard has and the size of the shard, so that
    :func:`read_shards` can tell a shard cut short from a complete one.

    Args:
        samples: a map-style dataset (read by position) or an iterable of samples. Samples
            are dicts, or tuples with ``names``.
        pattern: shard path with a printf field, e.g. ``"shards/train-%06d.tar"`` (a local
            path or a ``file:`` URL).
        maxcount: samples per shard; maxsize: bytes per shard.
        fields: the fields to write, each with its extension (None: chosen by type). Default:
            every field, extensions by type (tensor/array ``npy``, int ``cls``, str ``txt``,
            float/bool/list/dict ``json``).
        encoders: extension -> ``value -> bytes`` for other formats (e.g. ``"png"``).
            Pickle-based extensions (``pyd``, ``pickle``, ``pth``, ...) are refused.
        names: field names of the positions of tuple samples.
        index_field: name of the dataset-index member.
        allow_pipe: let webdataset open ``pattern`` when it is a ``pipe:`` (a shell
            command), ``http:``, ``s3:`` ... URL; no manifest is written then.

    Examples:
        >>> import os, tempfile
        >>> import torch
        >>> data = [{"image": torch.full((2,), float(i)), "label": i % 2} for i in range(5)]
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     paths = write_shards(data, os.path.join(folder, "s-%02d.tar"), maxcount=3)
        ...     names = sorted(os.listdir(folder))
        ...     manifest = read_manifest(paths[1])
        >>> names
        ['s-00.tar', 's-00.tar.manifest.json', 's-01.tar', 's-01.tar.manifest.json']
        >>> manifest["samples"], manifest["fields"]
        (2, ['image', 'index', 'label'])
    """
    wds = _wds()
    maxcount = check_int("maxcount", maxcount, minimum=1)
    index_field = _check_name(index_field, "index_field")
    if not isinstance(allow_pipe, bool):
        fail("allow_pipe", "True or False", allow_pipe)
    if isinstance(pattern, os.PathLike):
        pattern = os.fspath(pattern)
    if not isinstance(pattern, str):
        fail("pattern", "a path with a printf field such as 'train-%06d.tar'", pattern)
    local = local_path(pattern, "pattern", allow_pipe)
    target = pattern if local is None else local
    try:
        target % 0
    except (TypeError, ValueError):
        fail("pattern", "a path with one printf field such as 'train-%06d.tar'", pattern)
    wanted = None if fields is None else {_check_name(k, "fields"): v for k, v in dict(fields).items()}
    for ext in list((wanted or {}).values()) + list(encoders or {}):
        if ext in UNSAFE_EXTENSIONS:
            fail("fields/encoders", "no pickle-based extension", f".{ext}", raw=True)
    shards = _Shards(local is not None)
    with wds.ShardWriter(target, maxcount=maxcount, maxsize=maxsize, verbose=0, encoder=False,
                         post=shards.finished, mtime=0.0,
                         opener=shards.open if local is not None else None) as sink:
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
            shards.add(sink.fname, record)
    return shards.paths


# --------------------------------------------------------------------------- reading
class _ShardReader:
    """The stage of :func:`read_shards`: shard URLs in, checked and decoded samples out."""

    def __init__(self, decoder: Callable[[Any], Any], counter: SkipCounter, strict: bool,
                 required: Optional[FrozenSet[str]], allow_pipe: bool) -> None:
        self.decoder, self.counter, self.strict = decoder, counter, strict
        self.required, self.allow_pipe = required, allow_pipe

    def __call__(self, source: Iterable[Any]) -> Iterator[Dict[str, Any]]:
        for item in source:
            yield from self.read(item["url"] if isinstance(item, Mapping) else item)

    def _skip(self, error: CMDAError, samples: int, unknown: bool = False) -> None:
        if self.strict:
            raise error
        self.counter.skip(error, samples=samples, unknown=unknown)

    def _open(self, url: str, local: Optional[str]) -> IO[bytes]:
        return open(local, "rb") if local is not None else _wds().gopen(url, "rb")

    def _need(self, url: str, manifest: Optional[Dict[str, Any]]) -> FrozenSet[str]:
        if manifest is None:
            return self.required or frozenset()
        listed = frozenset(manifest["fields"])
        if self.required is None:
            return listed
        if not self.required <= listed:
            fail("required", f"fields that the manifest of shard {url!r} lists ({', '.join(sorted(listed))})",
                 ", ".join(sorted(self.required - listed)), raw=True)
        return self.required

    def read(self, url: str) -> Iterator[Dict[str, Any]]:
        """The samples of one shard; at its end, what it lacks is counted (or raised)."""
        local = local_path(url, "urls", self.allow_pipe)
        manifest = read_manifest(local) if local is not None else None
        need = self._need(url, manifest)
        problems: List[str] = []
        if manifest is not None:
            size = os.path.getsize(local) if os.path.isfile(local) else None
            if size != manifest["bytes"]:
                problems.append(f"{'no file' if size is None else f'{size} bytes'} where its manifest "
                                f"says {manifest['bytes']} bytes")
                if self.strict:
                    self._skip(self._damage(url, manifest, None, problems, None), 0)
        seen, damage = 0, None
        try:
            with self._open(url, local) as stream:
                for raw in raw_samples(stream, url):
                    seen += 1
                    if manifest is not None and seen > manifest["samples"]:
                        fail(f"shard {url!r}", f"at most {manifest['samples']} samples (its manifest)",
                             "more: the manifest does not belong to this shard", raw=True)
                    out = self._decode(raw, need, url)
                    if out is not None:
                        yield out
        except CMDAError:
            raise
        except Exception as error:  # a damaged shard: tarfile, OS or decompression errors
            damage = error
        lost = max(manifest["samples"] - seen, 0) if manifest is not None else 0
        if damage is not None or lost or problems:
            self._skip(self._damage(url, manifest, damage, problems, seen), lost,
                       unknown=manifest is None)

    def _damage(self, url: str, manifest: Optional[Dict[str, Any]], damage: Optional[BaseException],
                problems: List[str], seen: Optional[int]) -> ValidationError:
        text = list(problems)
        if damage is not None:
            text.append(f"{type(damage).__name__}: {damage}")
        if manifest is None:
            return ValidationError(f"shard {url!r}: expected a complete tar archive, got {'; '.join(text)} "
                                   f"after {seen} sample(s); it has no manifest, so how many samples were "
                                   "lost is unknown")
        got = f"{seen} sample(s)" if seen is not None else "a damaged file"
        lost = "" if seen is None else f" ({max(manifest['samples'] - seen, 0)} lost)"
        return ValidationError(f"shard {url!r}: expected {manifest['samples']} samples (its manifest), got "
                               f"{got}{lost}" + (f": {'; '.join(text)}" if text else "") + " (a truncated shard?)")

    def _decode(self, raw: Dict[str, Any], need: FrozenSet[str], url: str) -> Optional[Dict[str, Any]]:
        key = raw["__key__"]
        bad = raw.pop("__bad__", None)
        missing = sorted(need - {field_of(s) for s in raw if not s.startswith("__")})
        if bad or missing:
            got = bad or "a sample without " + ", ".join(missing) + " (a truncated shard?)"
            self._skip(ValidationError(f"sample {key!r} of shard {url!r}: expected the fields "
                                       f"{', '.join(sorted(need))}, got {got}"), 1)
            return None
        try:
            return self.decoder(raw)
        except MissingDependencyError:
            raise
        except Exception as error:  # a corrupt member: skip the sample
            if not isinstance(error, CMDAError):
                error = ValidationError(f"sample {key!r} of shard {url!r}: expected a sample the decoder "
                                        f"accepts, got {type(error).__name__}: {error}")
            self._skip(error, 1)
            return None


def _check_required(required: Any) -> Optional[FrozenSet[str]]:
    if required is None:
        return None
    if isinstance(required, (str, bytes)) or not isinstance(required, Iterable):
        fail("required", "None or a list of field names (fields are never inferred from a sample)", required)
    names = list(required)
    if not all(isinstance(name, str) and name for name in names):
        fail("required", "a list of field names (non-empty str)", names)
    return frozenset(names)


def read_shards(urls: Union[str, Sequence[str]], *, decoder: Optional[SafeDecoder] = None,
                counter: Optional[SkipCounter] = None, strict: bool = False,
                split_by_node: bool = False, split_by_worker: bool = True,
                required: Optional[Sequence[str]] = None, allow_pipe: bool = False) -> Any:
    """A ``wds.DataPipeline`` of decoded samples from tar shards (never unpickles, never runs a URL).

    Stages: shard list (``urls``: a list or a brace pattern such as
    ``"train-{000000..000009}.tar"``), optional ``wds.split_by_node``,
    ``wds.split_by_worker``, the shard reader (tar members grouped into samples, checked
    and decoded by ``decoder``), and a final stage that warns once with the number of
    skipped items. Append more stages with ``pipeline.append(...)`` (e.g. :func:`cmda_mix`,
    ``wds.batched(B, collation_fn=collate)``).

    A shard with a manifest (written by :func:`write_shards`) is checked against it: every
    sample must have the fields it lists, and the shard must hold as many samples as it
    says; whatever is missing (a shard cut short anywhere, a sample without a field, a
    corrupt member) is skipped and counted, or raises with ``strict=True``. For each such
    shard, samples emitted + ``counter.samples`` == samples written. A shard without a
    manifest is read as it is: samples that lack a field of ``required`` are skipped and
    counted, a tar that ends inside a member is counted as damaged (how many samples it
    lost is unknown), but a tar cut between two members cannot be told from a complete one.

    Args:
        urls: shard paths or a brace pattern; local paths or ``file:`` URLs.
        decoder: default ``SafeDecoder(counter=counter)``.
        counter: where skips are counted (default: a new :class:`SkipCounter`, available as
            ``pipeline.skip_counter``).
        strict: raise (a :class:`~cmda_data.ValidationError`) on the first damaged shard,
            incomplete sample or corrupt member instead of skipping it.
        split_by_node: give each distributed rank its own shards.
        split_by_worker: give each DataLoader worker its own shards.
        required: the fields every sample must have (names without extension, e.g.
            ``["image", "label", "index"]``). Default: the fields of each shard's manifest,
            no check for shards without one. Never inferred from a sample; extra members
            are kept and not checked.
        allow_pipe: let webdataset open ``pipe:`` (a shell command), ``http:``, ``s3:`` ...
            URLs, which starts a process per shard. Without it such URLs raise a
            :class:`~cmda_data.ValidationError` naming the URL, and nothing is started.
    """
    wds = _wds()
    for name, flag in (("strict", strict), ("split_by_node", split_by_node),
                       ("split_by_worker", split_by_worker), ("allow_pipe", allow_pipe)):
        if not isinstance(flag, bool):
            fail(name, "True or False", flag)
    counter = SkipCounter() if counter is None else counter
    if not isinstance(counter, SkipCounter):
        fail("counter", "a SkipCounter", counter)
    decoder = SafeDecoder(counter=counter) if decoder is None else decoder
    if not callable(decoder):
        fail("decoder", "a SafeDecoder (or a callable sample -> sample)", decoder)
    need = _check_required(required)
    if isinstance(urls, (str, os.PathLike)):
        listed = list(wds.shardlists.expand_urls(os.fspath(urls)))
    elif isinstance(urls, Iterable) and not isinstance(urls, (bytes, Mapping)):
        listed = [os.fspath(url) if isinstance(url, os.PathLike) else url for url in urls]
    else:
        fail("urls", "shard paths (a list) or a brace pattern (a str)", urls)
    if not listed:
        fail("urls", "at least one shard", urls)
    for url in listed:
        local_path(url, "urls", allow_pipe)
    stages: List[Any] = [wds.SimpleShardList(listed)]
    if split_by_node:
        stages.append(wds.split_by_node)
    if split_by_worker:
        stages.append(wds.split_by_worker)
    stages += [_ShardReader(decoder, counter, strict, need, allow_pipe), counter.report_at_end]
    pipeline = wds.DataPipeline(*stages)
    pipeline.skip_counter = counter
    return pipeline
