"""CMDAugment: CMDA as an ``nn.Module`` after the DataLoader, on any device.

Two sources of latents:

* **online CMDA** (``aligner=...``): the batch's student and teacher fields are embedded
  with the current aligner (no gradient), so the weights follow the latent space trained
  with the task (Eq. 9). The GMM of the intra-modal weights comes from ``gmm``, from the
  bank, or is fitted on the device on the batch's embeddings (every ``refit_every`` calls).
* **lookup** (``bank=...`` and no aligner): rows are looked up by the batch's dataset
  indices, exactly as :class:`~cmda_data.CMDACollate` does (same seed, same result).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..bank._build import embeds_by_index
from ..bank._plan import bank_plan, row_draws
from ..core._fields import Field, get_field
from ..core._seeding import hash_ints
from ..core._validation import check_int, fail
from ..core.build import build_plan
from ..core.mixture import GaussianMixture
from ..exceptions import FieldError, ValidationError
from ..options import MixOptions, resolve_fit_on
from ._base import MixingBase
from ._batch import batch_index, batch_student, keep_real_batch, mix_batch, name_nonfinite_row, with_field

__all__ = ["CMDAugment"]


class CMDAugment(MixingBase, nn.Module):
    """Mix the student field of a batch with CMDA weights: ``forward(batch) -> (batch, plan)``.

    The returned batch is a new dict (or tuple) with the student field mixed, the target
    turned into soft targets ``[B, C]`` and a ``mix_info`` record (see
    :class:`~cmda_data.CMDACollate`); the input batch is not modified. The weights carry no
    gradient; gradients still flow to the student samples themselves.

    Randomness: row ``r`` is mixed with probability ``p`` and its teacher chosen by
    draws that depend on ``(seed, epoch, rank, dataset index)`` when the batch carries
    ``index_field``, else by ``(seed, call number, epoch, rank, position in the batch)``.
    :meth:`set_p` changes ``p`` during training (e.g. the paper's attenuation coefficient).

    ``keep_real=True``: the returned batch holds the ``B`` real rows followed by the
    generated rows of the rows drawn as mixed, as :class:`~cmda_data.CMDACollate` does
    (``B + G`` rows; the returned plan is the plan of the ``B`` rows: the appended rows are
    its rows ``plan.mixed.nonzero()``).

    Args:
        bank: an :class:`~cmda_data.EmbeddingBank`: lookup mode without an aligner; with
            an aligner, only its GMM (and PCA) is used when ``gmm`` is None.
        options: the :class:`~cmda_data.MixOptions` (as in :class:`~cmda_data.CMDACollate`);
            its fields may also be given as keyword arguments, which override it.
        aligner: anything with ``embed(modality, batch) -> [n, d]`` (online CMDA). It is
            not registered as a submodule: train and move it yourself.
        gmm: a fitted :class:`~cmda_data.GaussianMixture` giving the responsibilities of the
            ``fit_on`` latents (online mode). :meth:`set_gmm` replaces it (e.g. refitted on
            all training latents at each epoch start).
        student: the student modality (default: the bank's; required without a bank).
        teachers: the teacher modality or modalities (default: the bank's; required
            without a bank).
        target: as in :class:`~cmda_data.CMDACollate`.
        num_classes: as in :class:`~cmda_data.CMDACollate`.
        fields: modality -> batch field (default: the modality name; ints for tuples).
        index_field: as in :class:`~cmda_data.CMDACollate` (None in online mode: rows are
            seeded by call number and position).
        info_key: as in :class:`~cmda_data.CMDACollate`.
        refit_every: online mode without ``gmm``/bank GMM: refit the GMM on the batch's
            ``fit_on`` latents every N calls (1: every batch, as the official code). None
            fits it once, on the first batch.
        n_components: M of the GMM the module fits; covariance_type: its covariance
            ("diag" by default: a batch has fewer samples than dimensions); gmm_options:
            more GaussianMixture settings.
        fit_on: ``"teacher"`` (the first teacher), ``"student"`` or a modality name.

    Examples:
        >>> from cmda_data.bank import EmbeddingBank
        >>> z = torch.nn.functional.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=1)
        >>> bank = EmbeddingBank({"image": z, "text": z}, student="image", teachers="text")
        >>> aug = CMDAugment(bank=bank, intra=None, p=1.0)
        >>> batch = {"image": torch.eye(4), "index": torch.arange(4)}
        >>> out, plan = aug(batch)
        >>> out["image"].sum(1)
        tensor([1., 1., 1., 1.])
    """

    def __init__(self, bank: Any = None, options: Optional[MixOptions] = None, *, aligner: Any = None,
                 gmm: Any = None, student: Optional[str] = None, teachers: Optional[Union[str, Sequence[str]]] = None,
                 target: Optional[Field] = None, num_classes: Optional[int] = None,
                 fields: Optional[Mapping[str, Field]] = None, index_field: Optional[Field] = "index",
                 info_key: str = "mix_info", refit_every: Optional[int] = None, n_components: int = 2,
                 covariance_type: str = "diag", gmm_options: Optional[Mapping[str, Any]] = None,
                 fit_on: str = "teacher", **mix_kwargs: Any) -> None:
        nn.Module.__init__(self)
        if aligner is None and bank is None:
            fail("aligner", "an aligner (online CMDA) or bank=EmbeddingBank (lookup)", None)
        if aligner is not None and not callable(getattr(aligner, "embed", None)):
            fail("aligner", "an object with embed(modality, batch) (see cmda_data.aligners)", aligner)
        lookup = aligner is None
        self._setup(bank, options, mix_kwargs, owner="CMDAugment", student=student, teachers=teachers,
                    target=target, num_classes=num_classes, fields=fields, info_key=info_key,
                    index_field=index_field, index_optional=True, bank_required=lookup, check_bank_roles=lookup)
        self.__dict__["aligner"] = aligner  # not a submodule: the user trains and moves it
        self.gmm = gmm
        modalities = (self.student, *self.teachers)
        self.fit_on = resolve_fit_on(fit_on, self.student, self.teachers, modalities)
        self.refit_every = check_int("refit_every", refit_every, minimum=1, allow_none=True)
        self.n_components = check_int("n_components", n_components, minimum=1)
        self.gmm_options = dict(gmm_options or {}, covariance_type=covariance_type)
        if lookup and gmm is not None:
            fail("gmm", "None in lookup mode (the bank's responsibilities are used)", gmm)
        self.calls = 0

    def set_gmm(self, gmm: Any) -> None:
        """Use ``gmm`` (a fitted :class:`~cmda_data.GaussianMixture`) for the intra-modal weights.

        Online mode only; its number of features must be the aligner's ``dim`` (when the
        aligner has one). None goes back to the bank's GMM or to fitting on the batches.
        With ``refit_every`` set, the module's own refits replace it on that schedule.

        Examples:
            Refit the GMM on all training latents at the start of each epoch (the paper's
            online CMDA):

            >>> from cmda_data.core.mixture import GaussianMixture
            >>> class Aligner:  # embeds a batch as itself (a stand-in for a trained aligner)
            ...     dim = 2
            ...     def embed(self, modality, batch):
            ...         return torch.nn.functional.normalize(batch, dim=1)
            >>> aligner = Aligner()
            >>> texts = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
            >>> aug = CMDAugment(aligner=aligner, student="image", teachers="text", p=1.0)
            >>> for epoch in range(2):
            ...     aug.set_epoch(epoch)
            ...     aug.set_gmm(GaussianMixture(2, random_state=epoch).fit(aligner.embed("text", texts)))
            ...     out, plan = aug({"image": texts[:4], "text": texts[:4]})  # the epoch's batches
            >>> out["image"].shape, aug.gmm.n_components
            (torch.Size([4, 2]), 2)
        """
        if gmm is not None:
            if self.aligner is None:
                fail("gmm", "None in lookup mode (the bank's responsibilities are used)", gmm)
            if not isinstance(gmm, GaussianMixture):
                fail("gmm", "a fitted cmda_data.GaussianMixture", gmm)
            gmm._check_fitted()  # NotFittedError
            means = gmm.means_
            dim = getattr(self.aligner, "dim", None)
            if isinstance(dim, int) and int(means.shape[1]) != dim:
                fail("gmm", f"a GaussianMixture fitted on {dim}-dimensional latents (the aligner's dim)",
                     f"one with {int(means.shape[1])} features")
        self.gmm = gmm

    def extra_repr(self) -> str:
        mode = "lookup" if self.aligner is None else "online"
        return f"mode={mode}, {self._options_repr()}, refit_every={self.refit_every}"

    # -- the GMM of online CMDA ------------------------------------------------------------
    def _responsibilities(self, latents: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        if self.options.intra is None:
            return None
        z = latents[self.fit_on]
        if self.gmm is None and self.refit_every is None and self.bank is not None and self.bank.gmm is not None:
            return self.bank.responsibilities_for(z)
        refit = self.refit_every is not None and self.calls % self.refit_every == 0
        if self.gmm is None or refit:
            if z.shape[0] < self.n_components:
                return None  # too few rows to fit M components: Eq. 10 weights only
            seed = hash_ints(self.options.seed, self.calls, self.options.rank) >> 1
            self.gmm = GaussianMixture(self.n_components, random_state=seed, **self.gmm_options).fit(z.detach())
        return self.gmm.predict_proba(z.detach().float()).float()

    def _embed(self, batch: Any, index: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        by_index = embeds_by_index(self.aligner)
        if by_index and index is None:
            fail(f"field {self.index_field!r} of the batch", "dataset indices (the aligner looks rows up by index)",
                 "a batch without them", FieldError, raw=True)
        latents = {}
        with torch.no_grad():
            for modality, field in self.fields.items():
                value = index if by_index else get_field(batch, field, "batch")
                latents[modality] = self.aligner.embed(modality, value).detach()
        return latents

    # -- forward ---------------------------------------------------------------------------
    def plan(self, batch: Any) -> Any:
        """The :class:`~cmda_data.MixPlan` of ``batch`` (draws, weights), on the batch's device."""
        student = batch_student(batch, self.fields[self.student], self.student_image)
        device = student.device
        n = student.shape[0]
        index = self._index(batch, required=self.aligner is None)
        keys = index.cpu() if index is not None else torch.arange(n)
        spec = self._current_spec()
        if index is None:  # no dataset index: seed by call number and position
            spec = spec.with_seed(hash_ints(spec.seed, self.calls) >> 1)
        with torch.no_grad():
            if self.aligner is None:
                plan = bank_plan(self.bank, keys, keys, spec, self.epoch)
            else:
                latents = self._embed(batch, index)
                mixed, choice = row_draws(keys, spec, self.epoch)
                resp = self._responsibilities(latents)
                # the batch is its own pool: a checked plan (one read-back for all the checks)
                plan = build_plan([latents[t].to(device) for t in spec.teachers], latents[spec.student].to(device),
                                  mixed=mixed.to(device), teacher_choice=choice.to(device),
                                  resp_rows=None if resp is None else resp.to(device),
                                  teacher_index=torch.arange(n, device=device), teacher=spec.teachers,
                                  similarity=spec.similarity, normalize=spec.normalize,
                                  temperature=spec.temperature, self_weight=spec.self_weight, intra=spec.intra,
                                  top_k=spec.top_k, exclude_self=spec.exclude_self, renormalize=spec.renormalize)
        return plan.to(device)

    def _index(self, batch: Any, required: bool) -> Optional[torch.Tensor]:
        if self.index_field is None:
            if required:
                fail("index_field", "the batch field holding dataset indices (lookup mode)", None)
            return None
        has = (self.index_field in batch) if isinstance(batch, Mapping) else True
        if not has and not required:
            return None
        return batch_index(batch, self.index_field)

    def forward(self, batch: Any) -> Tuple[Any, Any]:
        """Mix ``batch`` (a dict or tuple of tensors); returns ``(new_batch, plan)``."""
        if not isinstance(batch, (Mapping, tuple, list)):
            fail("batch", "a dict (or tuple) of batched fields", batch)
        plan = self.plan(batch)  # (an aligner embeds the student as given: uint8 images stay uint8 there)
        pixels = batch_student(batch, self.fields[self.student], self.student_image)  # uint8 -> float32
        if pixels is not get_field(batch, self.fields[self.student], "batch"):
            batch = with_field(batch, self.fields[self.student], pixels)
        index = self._index(batch, required=False)
        student = self.fields[self.student]
        try:
            out = mix_batch(batch, plan, student=student, target=self.target, num_classes=self.num_classes,
                            label_smoothing=self.label_smoothing,
                            index=None if index is None else index.to(plan.device), info_key=self.info_key)
        except ValidationError:
            name_nonfinite_row(batch_student(batch, student), index, student)
            raise
        if self.options.keep_real:
            out = keep_real_batch(batch, out, plan, target=self.target, num_classes=self.num_classes,
                                  label_smoothing=self.label_smoothing, info_key=self.info_key)
        self.calls += 1
        return out, plan
