"""CMDA on streams: :class:`CandidateBuffer` mixes each sample with partners from a buffer of recent ones.

A plain pipeline stage (a callable on an iterator of samples) that works in any
``wds.DataPipeline``; :func:`cmda_data.io.shards.read_shards` gives the stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Iterable, Iterator, Optional, Union

import torch

from ..bank._plan import row_draws
from ..core._fields import Field, as_index, get_field
from ..options import MixOptions
from ._base import MixingBase
from ._sample import mix_sample

__all__ = ["CandidateBuffer", "cmda_mix"]


class CandidateBuffer(MixingBase):
    """CMDA within a buffer of recent samples: a webdataset pipeline stage.

    Like ``wds.shuffle``'s buffer it keeps up to ``pool_size`` recent samples (first in,
    first out; originals, never generated samples), but the stream order is kept: every
    incoming sample yields one output. With probability ``p`` the incoming sample is
    replaced by the mix of the student fields of its candidate pool -- itself (unless
    ``exclude_self``) and the buffered samples -- weighted by its teacher's DCA weights over
    the pool (Eq. 10/11, bank rows looked up by the samples' dataset indices). The plan and
    the mix are those of :class:`~cmda_data.CrossModalAugmentedDataset` (one code path); the
    target becomes the soft target ``[C]`` and a ``mix_info`` field records ``"index"``,
    ``"partners"`` (dataset indices, ``[k]``, padded with the sample's own index and weight
    0), ``"weights"`` ``[k]``, ``"mixed"`` and ``"teacher"``, fixed-size tensors that
    ``default_collate`` stacks. With ``keep_real=True`` a mixed sample is yielded after its
    original (the stream grows by the generated samples).

    Randomness: whether a sample is mixed and which teacher guides it come from the draws
    of ``(seed, epoch, rank, dataset index)`` (the entry points' draws), so the output
    depends only on those and on the stream order. Which samples share a buffer depends on
    the order of the stream (shard order, ``split_by_worker``).

    Args:
        bank: the :class:`~cmda_data.EmbeddingBank` (rows of the samples' indices).
        options: the :class:`~cmda_data.MixOptions` (``pool_size``: how many recent samples
            are candidates); its fields may also be given as keyword arguments.
        student: the student modality (default: the bank's).
        teachers: the teacher modality or modalities (default: the bank's).
        target: field of the class index / class scores (None: none).
        num_classes: C, needed for class-index targets.
        fields: modality -> sample field (default: the modality name).
        index_field: the field with the dataset index (``"index"``, as written by
            :func:`~cmda_data.io.shards.write_shards`).
        info_key: name of the mix record.

    Examples:
        >>> from cmda_data.bank import EmbeddingBank
        >>> z = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
        >>> bank = EmbeddingBank({"image": z, "text": z}, student="image", teachers="text")
        >>> stream = [{"image": torch.full((2,), float(i)), "index": i} for i in range(6)]
        >>> stage = CandidateBuffer(bank, pool_size=3, top_k=2, p=1.0, intra=None)
        >>> out = list(stage(stream))
        >>> len(out), out[-1]["mix_info"]["partners"].shape
        (6, torch.Size([2]))
    """

    def __init__(self, bank: Any, options: Optional[MixOptions] = None, *, student: Optional[str] = None,
                 teachers: Optional[Union[str, Sequence[str]]] = None, target: Optional[Field] = None,
                 num_classes: Optional[int] = None, fields: Optional[Mapping[str, Field]] = None,
                 index_field: Field = "index", info_key: str = "mix_info", **mix_kwargs: Any) -> None:
        self._setup(bank, options, mix_kwargs, owner="CandidateBuffer", student=student, teachers=teachers,
                    target=target, num_classes=num_classes, fields=fields, info_key=info_key,
                    index_field=index_field)
        self.pool_size = self.options.pool_size
        pool = self.pool_size + (0 if self.options.exclude_self else 1)
        self.k = pool if self.options.top_k is None else min(self.options.top_k, pool)

    def __repr__(self) -> str:
        return f"CandidateBuffer(pool_size={self.pool_size}, {self._options_repr()})"

    def _index(self, sample: Any, position: int) -> int:
        where = f"{position} of the stream"
        return as_index(get_field(sample, self.index_field, where), self.index_field, where,
                        "write shards with write_shards, which stores index.cls")

    def mix_one(self, sample: Any, index: int, buffer: Sequence[tuple], *, mixed: Optional[bool] = None) -> Any:
        """The output for ``sample`` (dataset ``index``) given ``buffer`` of ``(index, sample)``.

        ``mixed``: None draws it (probability ``p``); True or False forces it (``keep_real``).
        """
        spec = self._current_spec()
        drawn, choice = row_draws(torch.tensor([index]), spec, self.epoch)  # the entry points' draws
        teacher = int(choice[0])
        mixed = bool(drawn[0]) if mixed is None else mixed
        pool = ([] if spec.exclude_self else [(index, sample)]) + list(buffer)
        if len(pool) == 1 and not spec.exclude_self:
            pool = []  # only itself: nothing to mix with
        samples = dict(pool)
        pool_index = torch.tensor([j for j, _ in pool], dtype=torch.long)
        return mix_sample(self, sample, index, mixed=mixed, teacher=teacher, width=self.k, pool=pool_index,
                          fetch=samples.__getitem__)

    def __call__(self, source: Iterable[Any]) -> Iterator[Any]:
        buffer: deque = deque(maxlen=self.pool_size)
        keep_real = self.options.keep_real
        for position, sample in enumerate(source):
            index = self._index(sample, position)
            if keep_real:  # the original, then (when it has a partner) a generated sample
                yield self.mix_one(sample, index, buffer, mixed=False)
                out = self.mix_one(sample, index, buffer, mixed=True)
                if bool(out[self.info_key]["mixed"]):
                    yield out
            else:
                yield self.mix_one(sample, index, buffer)
            buffer.append((index, sample))


def cmda_mix(bank: Any, options: Optional[MixOptions] = None, **kwargs: Any) -> CandidateBuffer:
    """The :class:`CandidateBuffer` stage: ``pipeline.append(cmda_mix(bank, pool_size=64, p=0.5))``.

    Examples:
        >>> from cmda_data.bank import EmbeddingBank
        >>> bank = EmbeddingBank({"x": torch.eye(3), "y": torch.eye(3)}, student="x", teachers="y")
        >>> cmda_mix(bank, pool_size=16, intra=None)
        CandidateBuffer(pool_size=16, student='x', teachers=['y'], p=0.5, top_k=8, intra=None, keep_real=False, seed=0, epoch=0)
    """
    return CandidateBuffer(bank, options, **kwargs)
