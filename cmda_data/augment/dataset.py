"""Dataset wrappers: IndexedDataset (samples carry their index) and CrossModalAugmentedDataset.

:class:`CrossModalAugmentedDataset` is CMDA at the sample level (offline CMDA): item ``i``
is, with probability ``p``, replaced by the mix of the student fields of partners chosen
from a random candidate pool by teacher ``i``'s weights (Eq. 10/11). Only the partners
with non-zero weight are read from the wrapped dataset, which is never modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, List, Optional, Union

import torch
from torch.utils.data import Dataset

from ..core import functional as Fn
from ..core._fields import Field, as_student, as_target, get_field, replace_fields
from ..core._seeding import SharedEpoch, SharedEpochMixin, SharedProbability, draw_row, row_generator
from ..core._validation import check_int, check_option, fail
from ..exceptions import FieldError, ShapeError, ValidationError
from ._batch import check_cpu_bank_in_workers, name_nonfinite_row, output_options
from ._planner import PlanOptions, bank_plan

__all__ = ["CrossModalAugmentedDataset", "IndexedDataset"]


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that every sample carries its dataset index.

    The rule: a dict sample gets a new key ``index_field`` (a copy of the dict; the key
    must not exist yet); a tuple or list sample gets the index appended as its last element
    (``(image, text, label) -> (image, text, label, index)``, so positions of the original
    fields do not change); any other sample ``x`` becomes ``(x, index)``.

    Examples:
        >>> data = IndexedDataset([{"x": 1}, {"x": 2}])
        >>> data[1]
        {'x': 2, 'index': 1}
        >>> IndexedDataset([(10, 0), (20, 1)])[0]
        (10, 0, 0)
    """

    def __init__(self, dataset: Any, index_field: str = "index") -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            fail("dataset", "a map-style dataset (with __getitem__ and __len__)", dataset)
        if not isinstance(index_field, str) or not index_field:
            fail("index_field", "a non-empty field name (str)", index_field)
        self.dataset = dataset
        self.index_field = index_field

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        if isinstance(sample, Mapping):
            if self.index_field in sample:
                fail(f"field {self.index_field!r} of sample {index}", "a field name not used by the samples "
                     "(choose another index_field)", "a sample that already has it", FieldError, raw=True)
            out = dict(sample)
            out[self.index_field] = index
            return out
        if isinstance(sample, (tuple, list)):
            return (*sample, index)
        return (sample, index)


class CrossModalAugmentedDataset(SharedEpochMixin, Dataset):
    """A map-style dataset whose items are, with probability ``p``, CMDA-generated samples.

    Item ``i``'s draws depend on ``(seed, epoch, rank, i)`` only (not on the worker that
    reads it): whether it is mixed, which teacher guides it, and a candidate pool of
    ``pool_size`` dataset indices (itself included unless ``exclude_self``; the whole dataset when
    ``pool_size >= len(dataset)``). Teacher ``i``'s DCA weights over the pool keep the
    ``top_k`` best partners; the student field becomes their weighted sum, the target the
    soft target ``[C]`` (float32, sums to 1, also for items that are not mixed) and a
    ``mix_info`` field records ``"index"`` (i), ``"partners"`` [k] dataset indices,
    ``"weights"`` [k], ``"mixed"`` and ``"teacher"``, fixed-size tensors that
    ``default_collate`` stacks. Items that are not mixed carry the identity (partners all
    ``i``, weights ``[1, 0, ...]``).

    With the pool covering the dataset, item ``i`` equals row ``i`` of
    :class:`~cmda_data.CMDACollate` (and :class:`~cmda_data.CMDAugment`) over one batch
    holding the whole dataset with the same seed: all three build plans in the same place.

    Args:
        dataset: the map-style dataset (dict or tuple samples); never modified.
        bank: an :class:`~cmda_data.EmbeddingBank` with one row per sample of ``dataset``.
        student: the student modality (default: the bank's).
        teachers: the teacher modality or modalities (default: the bank's).
        target: field of the class index / class scores (None: none).
        num_classes: C, needed for class-index targets.
        pool_size: candidates per item (m').
        top_k: partners kept per item (None: the whole pool).
        p: probability that an item is generated (mode ``"replace"``). :meth:`set_p` changes it
            during training (shared memory: reaches persistent workers, like :meth:`set_epoch`).
        mode: ``"replace"`` (length N) or ``"append"`` (length 2N: the N originals unchanged,
            then N generated samples, always mixed).
        intra: ``"soft"`` (Eq. 11), ``"hard"`` or None.
        similarity: see :func:`cmda_data.core.functional.inter_modal_weights`.
        temperature: see :func:`cmda_data.core.functional.inter_modal_weights`.
        exclude_self: keep the item's own sample out of its pool.
        seed: the seed of the draws.
        rank: the distributed rank, part of the seed. None (the default): the rank of the
            initialised torch.distributed process group, 0 without one, read when this object
            is made (make it after ``init_process_group``); an int chooses it.
        label_smoothing: epsilon of the soft targets.
        fields: modality -> sample field (default: the modality name; ints for tuples).
        info_key: name of the mix record in dict samples (tuples: appended last).

    Examples:
        >>> from cmda_data.bank import EmbeddingBank
        >>> z = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
        >>> bank = EmbeddingBank({"image": z, "text": z}, student="image", teachers="text")
        >>> data = [{"image": torch.full((2,), float(i)), "label": i % 3} for i in range(6)]
        >>> aug = CrossModalAugmentedDataset(data, bank, target="label", num_classes=3, p=1.0,
        ...                                  pool_size=4, top_k=2, intra=None)
        >>> item = aug[0]
        >>> item["label"].sum().item(), item["mix_info"]["partners"].shape
        (1.0, torch.Size([2]))
    """

    def __init__(self, dataset: Any, bank: Any, *, student: Optional[str] = None,
                 teachers: Optional[Union[str, Sequence[str]]] = None, target: Optional[Field] = None,
                 num_classes: Optional[int] = None, pool_size: int = 32, top_k: Optional[int] = 8, p: float = 0.5,
                 mode: str = "replace", intra: Optional[str] = "soft", similarity: str = "abs_cosine",
                 temperature: Optional[float] = None, exclude_self: bool = False, seed: int = 0, rank: Optional[int] = None,
                 label_smoothing: float = 0.0, fields: Optional[Mapping[str, Field]] = None,
                 info_key: str = "mix_info") -> None:
        from ..bank._bank import EmbeddingBank

        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            fail("dataset", "a map-style dataset (with __getitem__ and __len__)", dataset)
        if not isinstance(bank, EmbeddingBank):
            fail("bank", "an EmbeddingBank", bank)
        n = len(dataset)
        if bank.indices is not None or len(bank) != n:
            fail("bank", f"one row per sample of the dataset ({n} rows)",
                 f"a bank with {len(bank)} rows" + (" on a subset of indices" if bank.indices is not None else ""),
                 ShapeError, raw=True)
        self.dataset, self.bank = dataset, bank
        self.options = PlanOptions.create(
            student=student or bank.student, teachers=teachers or bank.teachers, bank=bank, p=p, intra=intra,
            top_k=top_k, similarity=similarity, temperature=temperature, exclude_self=exclude_self, seed=seed,
            rank=rank)
        self.pool_size = check_int("pool_size", pool_size, minimum=1)
        self.mode = check_option("mode", mode, ("replace", "append"))
        vars(self).update(output_options(self.options, fields=fields, target=target, num_classes=num_classes,
                                         label_smoothing=label_smoothing, info_key=info_key))
        others = n - 1
        self._pool_len = min(self.pool_size, others) if exclude_self else min(self.pool_size, n)
        if self._pool_len < 1:
            fail("exclude_self", "False for a dataset of one sample (no other partner)", exclude_self)
        self.k = self._pool_len if self.options.top_k is None else min(self.options.top_k, self._pool_len)
        self._epoch = SharedEpoch(0)
        self._p = SharedProbability(self.options.p)

    def __len__(self) -> int:
        n = len(self.dataset)
        return 2 * n if self.mode == "append" else n

    def __repr__(self) -> str:
        o = self.options
        return (f"CrossModalAugmentedDataset(n={len(self.dataset)}, mode={self.mode!r}, p={self.p}, "
                f"pool_size={self.pool_size}, top_k={o.top_k}, intra={o.intra!r}, seed={o.seed})")

    # -- items -----------------------------------------------------------------------------
    def pool(self, index: int, generator: torch.Generator) -> torch.Tensor:
        """The sorted candidate pool of ``index``, drawn from its generator (after its first draws)."""
        n = len(self.dataset)
        include_self = not self.options.exclude_self
        need = self._pool_len - (1 if include_self else 0)
        others = n - 1
        if need >= others:
            chosen = torch.arange(others)
        elif 4 * need >= others:
            chosen = torch.randperm(others, generator=generator)[:need]
        else:
            seen: dict = {}
            while len(seen) < need:
                for value in torch.randint(0, others, (2 * need,), generator=generator).tolist():
                    seen.setdefault(value, None)
                    if len(seen) == need:
                        break
            chosen = torch.tensor(list(seen), dtype=torch.long)
        chosen = chosen + (chosen >= index).long()  # skip the item itself
        if include_self:
            chosen = torch.cat([chosen, torch.tensor([index])])
        return torch.sort(chosen).values

    def __getitem__(self, item: int) -> Any:
        n = len(self.dataset)
        item = check_int("index", item)
        if item < 0:
            item += len(self)
        if not 0 <= item < len(self):
            raise IndexError(f"index: expected an integer in [0, {len(self)}), got {item}")
        base, forced = (item - n, True) if item >= n else (item, False)
        check_cpu_bank_in_workers(self.bank, "CrossModalAugmentedDataset")
        generator = row_generator(self.options.seed, self.epoch, base, self.options.rank)
        mixed, teacher = draw_row(generator, self.p, len(self.options.teachers))
        if self.mode == "append":
            mixed = forced
        sample = self.dataset[base]
        student = as_student(get_field(sample, self.student_field, base), self.student_field, base)
        partners = torch.full((self.k,), base, dtype=torch.long)
        weights = torch.zeros(self.k)
        weights[0] = 1.0
        if mixed:
            pool = self.pool(base, generator)
            own = (pool == base).nonzero()
            plan = bank_plan(self.bank, torch.tensor([base]), pool, self.options, self.epoch,
                             mixed=torch.tensor([True]), teacher_choice=torch.tensor([teacher]),
                             teacher_index=own[0] if len(own) else None, square=False).to("cpu")
            mixed = bool(plan.mixed[0])
            if mixed:
                partners, weights = pool[plan.index[0]], plan.weights[0]
        used = (weights > 0).nonzero().reshape(-1).tolist() if mixed else [0]
        samples = self._fetch(sample, base, [int(partners[u]) for u in used])
        updates = {}
        if mixed:
            values = []
            for j, s in samples:
                value = as_student(get_field(s, self.student_field, j), self.student_field, j)
                if value.shape != student.shape:
                    fail(f"field {self.student_field!r} of sample {j}",
                         f"shape {tuple(student.shape)} like sample {base} (its mixing partner)",
                         tuple(value.shape), FieldError)
                values.append(value)
            stack = torch.stack(values)
            try:
                updates[self.student_field] = Fn.mix(weights[used][None].to(stack.device), stack)[0]
            except ValidationError:
                name_nonfinite_row(stack, torch.tensor([j for j, _ in samples]), self.student_field)
                raise
        if self.target is not None:
            targets = [as_target(get_field(s, self.target, j), self.target, j, self.num_classes) for j, s in samples]
            if targets[0].ndim == 0 and self.num_classes is None:
                fail("num_classes", f"an integer (field {self.target!r} holds class indices)", None)
            updates[self.target] = Fn.mix_targets(weights[used][None], torch.stack(targets), self.num_classes,
                                                  self.label_smoothing)[0]
        info = {"index": torch.tensor(base), "partners": partners, "weights": weights,
                "mixed": torch.tensor(mixed), "teacher": torch.tensor(teacher)}
        return replace_fields(sample, updates, extra={self.info_key: info})

    def _fetch(self, sample: Any, base: int, indices: List[int]) -> List[tuple]:
        """``(index, sample)`` of each partner; the item's own sample is not read twice."""
        return [(j, sample if j == base else self.dataset[j]) for j in indices]
