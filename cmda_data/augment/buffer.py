"""CMDA on streams: :class:`CandidateBuffer` mixes each sample with partners from a buffer of recent ones.

A plain pipeline stage (a callable on an iterator of samples) that works in any
``wds.DataPipeline``; :func:`cmda_data.io.shards.read_shards` gives the stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Iterable, Iterator, Optional, Union

import torch

from ..core import functional as Fn
from ..core._fields import Field, as_index, as_student, as_target, get_field, replace_fields
from ..core._seeding import SharedEpoch, SharedEpochMixin, SharedProbability
from ..core._validation import check_int, fail
from ..exceptions import ShapeError
from ._batch import output_options
from ._planner import PlanOptions, bank_plan, row_draws

__all__ = ["CandidateBuffer", "cmda_mix"]


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
        from ..bank._bank import EmbeddingBank

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
