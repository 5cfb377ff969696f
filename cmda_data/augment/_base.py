"""What the four entry points share (private): options, roles, fields, the bank, epoch and ``p``.

:class:`MixingBase` reads the arguments every entry point takes in one place: the
:class:`~cmda_data.MixOptions` (or its fields as keyword arguments), the student and teacher
modalities (checked against the bank), the output fields, and the epoch and ``p`` shared with
DataLoader worker processes (:meth:`set_epoch`, :meth:`set_p`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Dict, Optional, Union

from ..bank import EmbeddingBank
from ..core._fields import Field, check_field_name, image_spec, resolve_fields
from ..core._seeding import SharedEpoch, SharedProbability
from ..core._validation import check_int, fail
from ..options import MixOptions, PlanOptions, split_options

__all__ = ["MixingBase"]


class MixingBase:
    """The shared base of :class:`~cmda_data.CrossModalAugmentedDataset`, :class:`~cmda_data.CMDACollate`,
    :class:`~cmda_data.CMDAugment` and :class:`~cmda_data.CandidateBuffer`.

    Attributes set by :meth:`_setup`: ``bank``, ``options`` (the :class:`~cmda_data.MixOptions`,
    ``rank`` resolved), ``spec`` (roles + options), ``student_field``, ``student_image``, ``target``,
    ``num_classes``, ``label_smoothing``, ``info_key`` and, when taken, ``index_field``.
    """

    bank: Optional[EmbeddingBank]
    options: MixOptions
    spec: PlanOptions

    def _setup(self, bank: Any, options: Optional[MixOptions], mix_kwargs: Mapping[str, Any], *, owner: str,
               student: Optional[str], teachers: Union[None, str, Sequence[str]], target: Optional[Field],
               num_classes: Optional[int], fields: Optional[Mapping[str, Field]], info_key: Any,
               index_field: Any = None, index_optional: bool = False, bank_required: bool = True,
               check_bank_roles: bool = True) -> None:
        """Check and store the arguments, in the order of the signatures (the first bad one is named)."""
        if bank is not None or bank_required:
            if not isinstance(bank, EmbeddingBank):
                hint = (" (an aligner goes to aligner=...)" if callable(getattr(bank, "embed", None)) else "")
                fail("bank", "an EmbeddingBank" + hint, bank)
        self.bank = bank
        mix = split_options(options, mix_kwargs, owner)
        if bank is not None:  # the roles default to the bank's
            student = bank.student if student is None or (isinstance(student, str) and not student) else student
            teachers = bank.teachers if teachers is None or (isinstance(teachers, (str, list, tuple)) and not teachers) \
                else teachers
        # (check_bank_roles False: an aligner gives the latents, the bank only its GMM)
        self.spec = PlanOptions.create(student=student, teachers=teachers, mix=mix,
                                       bank=bank if check_bank_roles else None)
        self.options = self.spec.mix
        if fields is not None and not isinstance(fields, Mapping):
            fail("fields", "None or a mapping modality -> sample field", fields)
        #: modality -> its sample field, every modality of the spec (default: the modality's name)
        self.fields: Dict[str, Field] = resolve_fields((self.spec.student, *self.spec.teachers), fields)
        self.student_field = self.fields[self.spec.student]
        #: the ImageField declaration of the student field (None: a plain field name)
        self.student_image = image_spec((fields or {}).get(self.spec.student))
        self.target = None if target is None else check_field_name("target", target)
        self.num_classes = check_int("num_classes", num_classes, minimum=1, allow_none=True)
        self.label_smoothing = self.options.label_smoothing
        if index_field is not None or not index_optional:
            self.index_field = check_field_name("index_field", index_field)
        else:
            self.index_field = None
        self.info_key = check_field_name("info_key", info_key)
        self._epoch = SharedEpoch(0)
        self._p = SharedProbability(self.options.p)

    @property
    def student(self) -> str:
        """The student modality (the one that is mixed)."""
        return self.spec.student

    @property
    def teachers(self) -> tuple:
        """The teacher modalities (with several, each row's teacher is drawn uniformly)."""
        return self.spec.teachers

    @property
    def p(self) -> float:
        """The probability that a row is mixed (shared with worker processes)."""
        return self._p.get()

    def set_p(self, p: float) -> None:
        """Set the probability that a row is mixed; reaches existing (persistent) workers.

        For a share of generated samples that changes during training (the paper's
        attenuation coefficient): call it between epochs, before ``iter(loader)``. The draws
        stay a function of ``(seed, epoch, rank, index, p)``: a row mixed under ``p`` is also
        mixed under any larger ``p``.
        """
        self._p.set(p)

    @property
    def epoch(self) -> int:
        """The epoch used by the draws (shared with worker processes)."""
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the draws; reaches existing (persistent) workers (call it before ``iter(loader)``)."""
        self._epoch.set(epoch)

    def _current_spec(self) -> PlanOptions:
        """``self.spec`` with the current ``p`` (the same object while ``p`` is unchanged)."""
        return self.spec.with_p(self._p.get())

    def _options_repr(self) -> str:
        o = self.options
        return (f"student={self.student!r}, teachers={list(self.teachers)}, p={self.p}, top_k={o.top_k}, "
                f"intra={o.intra!r}, keep_real={o.keep_real}, seed={o.seed}, epoch={self.epoch}")
