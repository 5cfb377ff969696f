"""CMDA on webdataset streams: shards, safe decoding, skip counting and the candidate buffer.

webdataset is an optional extra: it is imported inside the functions that need it
(:func:`write_shards`, :func:`read_shards`), so ``import cmda_data.streaming`` works without
it. The other pieces are plain pipeline stages (callables on an iterator of samples) and
work in any ``wds.DataPipeline``:

* :func:`write_shards` -- a dataset or iterable of dict samples to tar shards; tensors as
  ``.npy`` (never pickle), ints ``.cls``, strings ``.txt``, the rest ``.json``, and the
  sample's dataset index as ``index.cls`` so a bank row can be looked up.
* :class:`SafeDecoder` -- bytes back to values without ever unpickling: ``.pyd``,
  ``.pickle``, ``.pth`` ... members are dropped and counted (or raise, ``unsafe="error"``).
* :class:`SkipCounter` -- a webdataset ``handler=`` that skips and counts corrupt members,
  samples or shards, keeps their messages and warns once with the count.
* :class:`CandidateBuffer` (:func:`cmda_mix`) -- CMDA within a buffer of recent samples.
* :class:`~cmda_data.CMDACollate` is a ``collation_fn`` of ``wds.batched`` as it is.

Examples:
    >>> decoder = SafeDecoder()
    >>> sample = decoder({"__key__": "000000", "label.cls": b"3", "caption.txt": b"a cat"})
    >>> sample["label"], sample["caption"]
    (3, 'a cat')
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch

from . import functional as Fn
from ._codec import UNSAFE_EXTENSIONS, SafeDecoder, SkipCounter, SkippedSamplesWarning, encode_field
from ._fields import Field, as_index, as_student, as_target, get_field, replace_fields
from ._planner import PlanOptions, bank_plan, row_draws
from ._seeding import SharedEpoch, SharedEpochMixin, SharedProbability
from ._shared import output_options
from ._validation import check_int, fail
from .exceptions import MissingDependencyError, ShapeError

__all__ = [
    "CandidateBuffer",
    "SafeDecoder",
    "SkipCounter",
    "SkippedSamplesWarning",
    "cmda_mix",
    "read_shards",
    "write_shards",
]


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
    from torch.utils.data import IterableDataset

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
class CandidateBuffer(SharedEpochMixin):
    """CMDA within a buffer of recent samples: a webdataset pipeline stage.

    Like ``wds.shuffle``'s buffer it keeps up to ``buffer_size`` recent samples (first in,
    first out; originals, never generated samples), but the stream order is kept: every
    incoming sample yields one output. With probability ``p`` the incoming sample is
    replaced by the mix of the student fields of its candidate pool -- itself (unless
    ``exclude_self``) and the buffered samples -- weighted by its teacher's DCA weights over
    the pool (Eq. 10/11, bank rows looked up by the samples' dataset indices). The plan is
    built by the same code as :class:`~cmda_data.CrossModalAugmentedDataset` and
    :class:`~cmda_data.CMDACollate`; the target becomes the soft target ``[C]`` and a
    ``mix_info`` field records ``"index"``, ``"partners"`` (dataset indices, ``[k]``,
    padded with the sample's own index and weight 0), ``"weights"`` ``[k]``, ``"mixed"``
    and ``"teacher"``, fixed-size tensors that ``default_collate`` stacks.

    Randomness: whether a sample is mixed and which teacher guides it come from the
    generator of ``(seed, epoch, rank, dataset index)`` (the entry points' draws), so the
    output depends only on those and on the stream order. Which samples share a buffer
    depends on the order of the stream (shard order, ``split_by_worker``).

    Args:
        bank: the :class:`~cmda_data.EmbeddingBank` (rows of the samples' indices).
        student: the student modality (default: the bank's).
        teachers: the teacher modality or modalities (default: the bank's).
        target: field of the class index / class scores (None: none).
        num_classes: C, needed for class-index targets.
        buffer_size: how many recent samples are candidates.
        top_k: partners kept per sample (None: the whole pool).
        p: probability that a sample is replaced by a generated one.
        intra: see :class:`~cmda_data.CrossModalAugmentedDataset`.
        similarity: see :class:`~cmda_data.CrossModalAugmentedDataset`.
        temperature: see :class:`~cmda_data.CrossModalAugmentedDataset`.
        exclude_self: see :class:`~cmda_data.CrossModalAugmentedDataset`.
        label_smoothing: epsilon of the soft targets.
        seed: part of the draws' seed.
        rank: the distributed rank, part of the seed. None (the default): the rank of the
            initialised torch.distributed process group, 0 without one, read when this object
            is made (make it after ``init_process_group``); an int chooses it.
        fields: modality -> sample field (default: the modality name).
        index_field: the field with the dataset index (``"index"``, as written by
            :func:`write_shards`).
        info_key: name of the mix record.

    Examples:
        >>> from cmda_data.bank import EmbeddingBank
        >>> z = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
        >>> bank = EmbeddingBank({"image": z, "text": z}, student="image", teachers="text")
        >>> stream = [{"image": torch.full((2,), float(i)), "index": i} for i in range(6)]
        >>> stage = CandidateBuffer(bank, buffer_size=3, top_k=2, p=1.0, intra=None)
        >>> out = list(stage(stream))
        >>> len(out), out[-1]["mix_info"]["partners"].shape
        (6, torch.Size([2]))
    """

    def __init__(self, bank: Any, *, student: Optional[str] = None,
                 teachers: Optional[Union[str, Sequence[str]]] = None, target: Optional[Field] = None,
                 num_classes: Optional[int] = None, buffer_size: int = 64, top_k: Optional[int] = 8,
                 p: float = 0.5, intra: Optional[str] = "soft", similarity: str = "abs_cosine",
                 temperature: Optional[float] = None, exclude_self: bool = False, label_smoothing: float = 0.0,
                 seed: int = 0, rank: Optional[int] = None, fields: Optional[Mapping[str, Field]] = None,
                 index_field: Field = "index", info_key: str = "mix_info") -> None:
        from .bank import EmbeddingBank

        if not isinstance(bank, EmbeddingBank):
            fail("bank", "an EmbeddingBank", bank)
        self.bank = bank
        self.options = PlanOptions.create(
            student=student or bank.student, teachers=teachers or bank.teachers, bank=bank, p=p, intra=intra,
            top_k=top_k, similarity=similarity, temperature=temperature, exclude_self=exclude_self, seed=seed,
            rank=rank)
        self.buffer_size = check_int("buffer_size", buffer_size, minimum=1)
        vars(self).update(output_options(self.options, fields=fields, target=target, num_classes=num_classes,
                                         label_smoothing=label_smoothing, info_key=info_key,
                                         index_field=index_field))
        pool = self.buffer_size + (0 if exclude_self else 1)
        self.k = pool if self.options.top_k is None else min(self.options.top_k, pool)
        self._epoch = SharedEpoch(0)
        self._p = SharedProbability(self.options.p)

    def __repr__(self) -> str:
        o = self.options
        return (f"CandidateBuffer(buffer_size={self.buffer_size}, p={self.p}, top_k={o.top_k}, "
                f"intra={o.intra!r}, seed={o.seed}, epoch={self.epoch})")

    def _index(self, sample: Any, position: int) -> int:
        where = f"{position} of the stream"
        return as_index(get_field(sample, self.index_field, where), self.index_field, where,
                        "write shards with write_shards, which stores index.cls")

    def mix_one(self, sample: Any, index: int, buffer: Sequence[tuple]) -> Any:
        """The output for ``sample`` (dataset ``index``) given ``buffer`` of ``(index, sample)``."""
        o = self._current_options()
        drawn, choice = row_draws(torch.tensor([index]), o, self.epoch)  # the entry points' draws
        mixed, teacher = bool(drawn[0]), int(choice[0])
        student = as_student(get_field(sample, self.student_field, index), self.student_field, index)
        pool = ([] if o.exclude_self else [(index, sample)]) + list(buffer)
        partners = torch.full((self.k,), index, dtype=torch.long)
        weights = torch.zeros(self.k)
        weights[0] = 1.0
        if mixed and pool and not (len(pool) == 1 and not o.exclude_self):
            pool_index = torch.tensor([j for j, _ in pool], dtype=torch.long)
            plan = bank_plan(self.bank, torch.tensor([index]), pool_index, o, self.epoch,
                             mixed=torch.tensor([True]), teacher_choice=torch.tensor([teacher]),
                             teacher_index=None if o.exclude_self else torch.tensor([0]),
                             square=False).to("cpu")
            mixed = bool(plan.mixed[0])
            if mixed:
                used = plan.index[0]
                k = used.shape[0]
                partners[:k], weights[:] = pool_index[used], 0.0
                weights[:k] = plan.weights[0]
                chosen = [pool[int(u)] for u in used]
        else:
            mixed = False
        updates = {}
        if mixed:
            stack = []
            for j, other in chosen:
                value = as_student(get_field(other, self.student_field, j), self.student_field, j)
                if value.shape != student.shape:
                    fail(f"field {self.student_field!r} of sample {j}", f"shape {tuple(student.shape)} like "
                         f"sample {index}", tuple(value.shape), ShapeError)
                stack.append(value)
            updates[self.student_field] = Fn.mix(weights[:len(stack)][None], torch.stack(stack))[0]
        if self.target is not None:
            pairs = chosen if mixed else [(index, sample)]
            targets = torch.stack([as_target(get_field(s, self.target, j), self.target, j, self.num_classes)
                                   for j, s in pairs])
            if targets.ndim == 1 and self.num_classes is None:
                fail("num_classes", f"an integer (field {self.target!r} holds class indices)", None)
            w = weights[:len(pairs)][None] if mixed else torch.ones(1, 1)
            updates[self.target] = Fn.mix_targets(w, targets, self.num_classes, self.label_smoothing)[0]
        info = {"index": torch.tensor(index), "partners": partners, "weights": weights,
                "mixed": torch.tensor(mixed), "teacher": torch.tensor(teacher)}
        return replace_fields(sample, updates, extra={self.info_key: info})

    def __call__(self, source: Iterable[Any]) -> Iterator[Any]:
        buffer: deque = deque(maxlen=self.buffer_size)
        for position, sample in enumerate(source):
            index = self._index(sample, position)
            yield self.mix_one(sample, index, buffer)
            buffer.append((index, sample))


def cmda_mix(bank: Any, **options: Any) -> CandidateBuffer:
    """The :class:`CandidateBuffer` stage: ``pipeline.append(cmda_mix(bank, buffer_size=64, p=0.5))``.

    Examples:
        >>> from cmda_data.bank import EmbeddingBank
        >>> bank = EmbeddingBank({"x": torch.eye(3), "y": torch.eye(3)}, student="x", teachers="y")
        >>> cmda_mix(bank, buffer_size=16, intra=None)
        CandidateBuffer(buffer_size=16, p=0.5, top_k=8, intra=None, seed=0, epoch=0)
    """
    return CandidateBuffer(bank, **options)
