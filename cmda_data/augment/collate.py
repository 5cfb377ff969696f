"""CMDACollate: CMDA inside ``collate_fn`` (CPU, DataLoader workers, webdataset).

The per-batch form of the paper (the pool m' is the batch): ``default_collate`` first, then
each row's teacher latent (looked up in an :class:`~cmda_data.EmbeddingBank` by the
sample's dataset index) weights the student samples of the batch (Eq. 10/11), and rows
drawn with probability ``p`` are replaced by the mix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch.utils.data import default_collate, get_worker_info

# the documented extension point of default_collate
from torch.utils.data._utils.collate import collate as _collate_with
from torch.utils.data._utils.collate import default_collate_fn_map

from ..bank._plan import bank_plan
from ..core._fields import (
    Field,
    as_index,
    as_student,
    as_target,
    check_targets_batch,
    get_field,
    is_pil_image,
    pil_to_tensor,
    replace_fields,
)
from ..core._validation import fail, field_error
from ..exceptions import CMDAError, ValidationError
from ..options import MixOptions
from ._base import MixingBase
from ._batch import (
    batch_index,
    batch_student,
    check_cpu_bank_in_workers,
    keep_real_batch,
    mix_batch,
    name_nonfinite_row,
    pack_batch,
    with_field,
)

__all__ = ["CMDACollate"]


def _stack_plain(batch: Sequence[torch.Tensor], *, collate_fn_map: Any = None) -> torch.Tensor:
    """Stack tensors in ordinary memory (the batch is packed into one shared segment later)."""
    return torch.stack(list(batch), 0)


def _collate_plain(samples: list) -> Any:
    """``default_collate``, except that tensors are stacked in ordinary memory inside workers."""
    if get_worker_info() is None:
        return default_collate(samples)
    return _collate_with(samples, collate_fn_map={**default_collate_fn_map, torch.Tensor: _stack_plain})


class CMDACollate(MixingBase):
    """A ``collate_fn`` that mixes the student field of each batch with CMDA weights.

    Samples must carry their dataset index (wrap the dataset in
    :class:`~cmda_data.IndexedDataset`): the bank rows of those indices give the teacher and
    student latents and the GMM responsibilities. The output is the collated batch with the
    student field mixed, the target turned into soft targets ``[B, C]`` (float32, rows sum
    to 1; also for rows that are not mixed) and ``mix_info``: ``"index"`` [B],
    ``"partners"`` [B, k] dataset indices, ``"weights"`` [B, k] (rows sum to 1),
    ``"mixed"`` [B] and ``"teacher"`` [B]. Dict batches get a ``"mix_info"`` key; tuple
    batches get the record appended after the index.

    Randomness: row ``r`` is mixed with probability ``p`` and its teacher chosen by
    draws that depend on ``(seed, epoch, rank, dataset index)`` only, so batches do not
    depend on ``num_workers``. :meth:`set_epoch` writes the epoch to shared memory, which
    worker processes read, also persistent ones: call it before ``iter(loader)``.
    :meth:`set_p` does the same for ``p`` (a share of mixed rows that changes during
    training, e.g. the paper's attenuation coefficient).

    ``keep_real=True`` (the paper trains on the B real samples plus the generated ones):
    the output holds the ``B`` real rows (every field as ``default_collate`` gives it, the
    target as soft targets) followed by one generated row for each row drawn as mixed (``G``
    rows, in batch order; ``G = B`` with ``p=1`` when every row has a partner). Every
    field, the soft targets and ``mix_info`` have ``B + G`` rows; ``mix_info["mixed"]``
    is False for the real rows and True for the appended ones; ``mix_info["source"]``
    gives each row's position in the real part (the row it was generated from).

    It never uses CUDA inside a worker process (a CUDA bank there raises
    :class:`DeviceError`; mix on the GPU with :class:`~cmda_data.CMDAugment`). It pickles
    cleanly, takes batches of any size (a sample with no other partner keeps itself) and
    serves as webdataset's ``collation_fn`` (it takes a list of samples).

    Args:
        bank: the :class:`~cmda_data.EmbeddingBank` (CPU; call ``bank.share_memory_()`` or
            load it with ``mmap=True`` so workers share one copy).
        options: the :class:`~cmda_data.MixOptions` (default ``MixOptions()``: ``p=0.5``,
            ``top_k=8``, ...); its fields may also be given as keyword arguments
            (``p=1.0, keep_real=True``), which override it.
        student: student modality (default ``bank.student``).
        teachers: teacher modality/modalities (default ``bank.teachers``); with several, each
            row's teacher is drawn uniformly.
        target: field of the class index / class scores (None: no target).
        num_classes: number of classes C (needed for class-index targets).
        fields: modality -> field of the sample (default: the modality name; ints for tuples).
        index_field: field holding the dataset index (tuples: the last position).
        info_key: name of the mix record in dict batches.

    Examples:
        >>> from cmda_data.bank import EmbeddingBank
        >>> from cmda_data.augment.dataset import IndexedDataset
        >>> z = torch.nn.functional.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=1)
        >>> bank = EmbeddingBank({"image": z, "text": z}, student="image", teachers="text")
        >>> data = IndexedDataset([{"image": torch.full((3,), float(i)), "label": i % 2} for i in range(8)])
        >>> collate = CMDACollate(bank, target="label", num_classes=2, intra=None, p=1.0)
        >>> batch = collate([data[i] for i in range(4)])
        >>> batch["image"].shape, batch["label"].shape, batch["mix_info"]["weights"].sum(1)
        (torch.Size([4, 3]), torch.Size([4, 2]), tensor([1., 1., 1., 1.]))
    """

    def __init__(self, bank: Any, options: Optional[MixOptions] = None, *, student: Optional[str] = None,
                 teachers: Optional[Union[str, Sequence[str]]] = None, target: Optional[Field] = None,
                 num_classes: Optional[int] = None, fields: Optional[Mapping[str, Field]] = None,
                 index_field: Field = "index", info_key: str = "mix_info", **mix_kwargs: Any) -> None:
        self._setup(bank, options, mix_kwargs, owner="CMDACollate", student=student, teachers=teachers,
                    target=target, num_classes=num_classes, fields=fields, info_key=info_key,
                    index_field=index_field)

    def __repr__(self) -> str:
        return f"CMDACollate({self._options_repr()})"

    # -- collation -------------------------------------------------------------------------
    def _check_samples(self, samples: Sequence[Any]) -> None:
        """Per-sample checks, so errors name the field and the dataset index."""
        tuple_index = -1 if isinstance(self.index_field, str) else self.index_field
        shapes: dict = {}  # field -> (shape, index) of the first sample
        for position, sample in enumerate(samples):
            index_key = self.index_field if isinstance(sample, Mapping) else tuple_index
            where = f"{position} of the batch"
            if isinstance(sample, Mapping) and index_key not in sample:
                keys = ", ".join(repr(k) for k in list(sample)[:12])
                field_error(index_key, where, f"the sample's dataset index (keys: {keys}): wrap the dataset in "
                            "IndexedDataset; a Hugging Face Trainer drops columns its model does not take, so "
                            "pass TrainingArguments(remove_unused_columns=False)", "a sample without it")
            index = as_index(get_field(sample, index_key, where), index_key, where,
                             "wrap the dataset in IndexedDataset so every sample carries its index")
            values = [(self.student_field, as_student(get_field(sample, self.student_field, index),
                                                      self.student_field, index, self.student_image))]
            if self.target is not None:
                values.append((self.target, as_target(get_field(sample, self.target, index), self.target, index,
                                                      self.num_classes)))
            for field, value in values:
                shape, first = shapes.setdefault(field, (tuple(value.shape), index))
                if tuple(value.shape) != shape:
                    field_error(field, index, f"shape {shape} like sample {first} (samples of a batch are "
                                "stacked)", tuple(value.shape))

    def _decode_images(self, samples: list) -> list:
        """PIL images in the student field (a Hugging Face image column) as uint8 ``[C, H, W]`` tensors."""
        field = self.student_field
        first = samples[0]
        try:
            if not is_pil_image(get_field(first, field, 0)):
                return samples
        except CMDAError:  # (a sample without the field: the checks after collation name it)
            return samples
        out = []
        for position, sample in enumerate(samples):
            value = get_field(sample, field, f"{position} of the batch")
            out.append(replace_fields(sample, {field: pil_to_tensor(value)}) if is_pil_image(value) else sample)
        return out

    def __call__(self, samples: Sequence[Any]) -> Any:
        if isinstance(samples, (str, bytes, Mapping)) or not isinstance(samples, Sequence) or not samples:
            fail("samples", "a non-empty list of samples", samples)
        bank = self.bank
        check_cpu_bank_in_workers(bank, "CMDACollate")
        batch, index = self._collate(list(samples))
        plan = bank_plan(bank, index, index, self._current_spec(), self.epoch)
        if plan.device.type != "cpu":
            plan = plan.to("cpu")
        real = batch
        keep_real = self.options.keep_real
        if keep_real:  # mix a copy of the student: the real one is kept
            batch = with_field(batch, self.student_field, batch_student(batch, self.student_field).clone())
        try:
            out = mix_batch(batch, plan, student=self.student_field, target=self.target,
                            num_classes=self.num_classes, label_smoothing=self.label_smoothing, index=index,
                            info_key=self.info_key, inplace=True)
        except ValidationError:
            name_nonfinite_row(batch_student(batch, self.student_field), index, self.student_field)
            raise
        if keep_real:
            out = keep_real_batch(real, out, plan, target=self.target, num_classes=self.num_classes,
                                  label_smoothing=self.label_smoothing, info_key=self.info_key)
        if get_worker_info() is not None:  # one shared-memory segment per batch instead of one per tensor
            out = pack_batch(out, self.info_key, shared=True)
        return out

    def _collate(self, samples: list) -> tuple:
        """``default_collate`` + checks of the batch; on a problem, find the sample at fault."""
        samples = self._decode_images(samples)
        try:
            batch = _collate_plain(samples)
            if not isinstance(batch, Mapping):
                batch = tuple(batch)
            index = batch_index(batch, self.index_field)
            student = batch_student(batch, self.student_field, self.student_image)  # uint8 -> float32
            if student is not get_field(batch, self.student_field, "batch"):
                batch = with_field(batch, self.student_field, student)
            targets = None
            if self.target is not None:
                targets = check_targets_batch(get_field(batch, self.target, "batch"), self.target, self.num_classes)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError):
            self._check_samples(samples)  # raises a FieldError naming the field and the sample
            raise
        if targets is not None and not targets.is_floating_point() and targets.numel():
            low, high = torch.aminmax(targets)
            if int(low) < 0 or int(high) >= self.num_classes:
                self._check_samples(samples)  # names the sample whose class index is out of range
        return batch, index
