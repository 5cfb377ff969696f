"""MixOptions: every mixing knob of CMDA, declared once (its default, its check, its meaning).

All four entry points (:class:`~cmda_data.CrossModalAugmentedDataset`,
:class:`~cmda_data.CMDACollate`, :class:`~cmda_data.CMDAugment`,
:class:`~cmda_data.CandidateBuffer`) and :meth:`EmbeddingBank.plan
<cmda_data.bank.EmbeddingBank.plan>` take one :class:`MixOptions` (or its fields as keyword
arguments, forwarded here), so the same options mean the same thing, with the same defaults,
everywhere: one seed gives the same samples through any entry point.

Examples:
    >>> options = MixOptions(p=1.0, top_k=4)
    >>> options.top_k, options.intra, options.seed
    (4, 'soft', 0)
    >>> options.replace(seed=3).seed
    3
    >>> MixOptions(p=2.0)
    Traceback (most recent call last):
        ...
    cmda_data.exceptions.ValidationError: p: expected a probability in [0, 1], got 2.0 (float)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from .core._seeding import get_rank
from .core._validation import (
    check_bool,
    check_int,
    check_label_smoothing,
    check_option,
    check_positive_float,
    check_probability,
    check_temperature,
    fail,
)
from .core.functional import INTRA_MODES, NORMALIZATIONS, SIMILARITIES

__all__ = ["MixOptions"]


#: field -> its check, returning the normalised value (each knob is checked here only)
_CHECKS: Dict[str, Callable[[str, Any], Any]] = {
    "p": lambda name, v: float(check_probability(name, v)),
    "top_k": lambda name, v: check_int(name, v, minimum=1, allow_none=True),
    "intra": lambda name, v: check_option(name, v, (*INTRA_MODES, None)),
    "similarity": lambda name, v: check_option(name, v, SIMILARITIES),
    "normalize": lambda name, v: check_option(name, v, NORMALIZATIONS),
    "temperature": check_temperature,
    "self_weight": lambda name, v: check_positive_float(name, v, allow_zero=True, allow_none=True),
    "exclude_self": check_bool,
    "renormalize": check_bool,
    "label_smoothing": check_label_smoothing,
    "seed": lambda name, v: check_int(name, v),
    "rank": lambda name, v: check_int(name, v, minimum=0, allow_none=True),
    "keep_real": check_bool,
    "pool_size": lambda name, v: check_int(name, v, minimum=1),
}


@dataclass(frozen=True)
class MixOptions:
    """How CMDA mixes: one frozen record, taken by every entry point.

    Attributes:
        p: probability that a row (a sample) is replaced by a generated one. The paper
            trains on the real batch plus the generated rows: ``keep_real=True, p=1.0``.
            ``set_p`` on an entry point changes it during training (the paper's attenuation).
        top_k: partners kept per generated row, the ``k`` largest weights (None: the whole
            pool; the paper's Alg. 1 uses every sample of the batch).
        intra: the intra-modal weights (Eq. 11): ``"soft"`` (the paper's product of
            responsibilities), ``"hard"`` (the official code's same-cluster mask) or None
            (inter-modal weights only, Eq. 10; needed for a bank without a GMM).
        similarity: ``"abs_cosine"`` (Eq. 10) or ``"cosine"`` (see
            :func:`cmda_data.core.functional.inter_modal_weights`).
        normalize: how Eq. 10's weights are normalised: ``"row"``, ``"legacy_broadcast"``
            (the official code's broadcast) or ``"none"``.
        temperature: None (Eq. 10 as printed) or a softmax temperature over similarities.
        self_weight: None, or the weight of a row's own sample before normalisation.
        exclude_self: a row never uses its own sample (a row with no other partner keeps
            itself, unmixed).
        renormalize: rows of the final weights sum to 1 (False keeps Alg. 1's rows).
        label_smoothing: epsilon of the soft targets, in [0, 1).
        seed: the seed of the draws (which rows are mixed, which teacher guides a row: a
            function of ``(seed, epoch, rank, index)``; the dataset's candidate pools: of
            ``(seed, epoch, index)``).
        rank: the distributed rank, part of the seed. None: the rank of the initialised
            torch.distributed process group (0 without one), read when an entry point is made.
        keep_real: keep every real sample and add the generated ones (the per-batch entry
            points append the ``G`` generated rows to the ``B`` real ones; the dataset has
            ``2N`` items: the ``N`` originals, then ``N`` generated ones). False: generated
            rows replace their originals.
        pool_size: candidates per generated sample for the per-sample entry points: the
            dataset's pool of an item is its block of ``pool_size`` samples (``+ 1`` with
            ``exclude_self``, the item itself left out) in the epoch's random order (see
            ``CrossModalAugmentedDataset.sampler``), the stream buffer keeps
            ``pool_size`` recent samples. The per-batch entry points use the batch.
    """

    p: float = 0.5
    top_k: Optional[int] = 8
    intra: Optional[str] = "soft"
    similarity: str = "abs_cosine"
    normalize: str = "row"
    temperature: Optional[float] = None
    self_weight: Optional[float] = None
    exclude_self: bool = False
    renormalize: bool = True
    label_smoothing: float = 0.0
    seed: int = 0
    rank: Optional[int] = None
    keep_real: bool = False
    pool_size: int = 32

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _CHECKS[field.name](field.name, getattr(self, field.name)))

    def replace(self, **changes: Any) -> "MixOptions":
        """A copy with ``changes`` (checked like the constructor's arguments)."""
        unknown = sorted(set(changes) - set(_CHECKS))
        if unknown:
            fail(unknown[0], "a field of MixOptions (" + ", ".join(_CHECKS) + ")", changes[unknown[0]])
        return dataclasses.replace(self, **changes)

    @classmethod
    def create(cls, options: Optional["MixOptions"] = None, **changes: Any) -> "MixOptions":
        """``options`` (default ``MixOptions()``) with ``changes``: how the entry points read their arguments."""
        if options is None:
            options = cls()
        elif not isinstance(options, MixOptions):
            fail("options", "a MixOptions (or None)", options)
        return options.replace(**changes) if changes else options

    def resolved(self) -> "MixOptions":
        """The same options with ``rank`` read from torch.distributed when it is None."""
        return self if self.rank is not None else dataclasses.replace(self, rank=get_rank())


@dataclass(frozen=True)
class PlanOptions:
    """What a plan is drawn from (private): the roles of the modalities and the mixing options.

    The mixing fields read through (``spec.top_k`` is ``spec.mix.top_k``).
    """

    student: str
    teachers: Tuple[str, ...]
    mix: MixOptions

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "mix":  # (pickle looks up dunders before fields exist)
            raise AttributeError(name)
        return getattr(self.mix, name)

    def with_p(self, p: float) -> "PlanOptions":
        """The same spec with ``p`` (itself when unchanged)."""
        return self if p == self.mix.p else dataclasses.replace(self, mix=self.mix.replace(p=p))

    def with_seed(self, seed: int) -> "PlanOptions":
        """The same spec with ``seed``."""
        return dataclasses.replace(self, mix=self.mix.replace(seed=seed))

    @classmethod
    def create(cls, *, student: Optional[str], teachers: Union[None, str, Sequence[str]], mix: MixOptions,
               bank: Any = None) -> "PlanOptions":
        """Check the roles (against ``bank``'s modalities and GMM when given); ``mix.rank`` resolved."""
        if bank is not None:
            student = bank.student if student is None or (isinstance(student, str) and not student) else student
            teachers = bank.teachers if teachers is None or (isinstance(teachers, (str, list, tuple)) and not teachers) \
                else teachers
        if not isinstance(student, str) or not student:
            fail("student", "the student modality name", student)
        if not (teachers is None or isinstance(teachers, (str, Sequence))):
            fail("teachers", "one or more teacher modality names", teachers)
        teachers = (teachers,) if isinstance(teachers, str) else tuple(teachers or ())
        if not teachers or not all(isinstance(t, str) and t for t in teachers):
            fail("teachers", "one or more teacher modality names", teachers)
        if student in teachers:
            fail("teachers", f"modalities other than the student {student!r}", teachers)
        if bank is not None:
            if student != bank.student and student not in bank.modalities:
                fail("student", "a modality of the bank (" + ", ".join(map(repr, bank.modalities)) + ")", student)
            for teacher in teachers:
                if teacher not in bank.modalities:
                    fail("teachers", "modalities of the bank other than the student ("
                         + ", ".join(map(repr, bank.modalities)) + ")", teacher)
            if mix.intra is not None and bank.responsibilities is None:
                fail("intra", "None for a bank without a GMM (or build the bank with fit_gmm=True)", mix.intra)
        return cls(student=student, teachers=teachers, mix=mix.resolved())


def resolve_fit_on(fit_on: Any, student: str, teachers: Sequence[str], modalities: Sequence[str]) -> str:
    """The modality a GMM is fitted on: ``"teacher"`` (the first teacher), ``"student"`` or a name in ``modalities``."""
    if fit_on == "teacher":
        return teachers[0]
    if fit_on == "student":
        return student
    return check_option("fit_on", fit_on, ("teacher", "student", *modalities))


def split_options(options: Optional[MixOptions], kwargs: Mapping[str, Any], owner: str) -> MixOptions:
    """``MixOptions.create(options, **kwargs)``, with an error naming ``owner`` for an unknown keyword."""
    unknown = sorted(set(kwargs) - set(_CHECKS))
    if unknown:
        fail(unknown[0], f"a keyword argument of {owner} or a field of MixOptions ("
             + ", ".join(_CHECKS) + ")", kwargs[unknown[0]])
    return MixOptions.create(options, **kwargs)
