"""EmbeddingBank: every sample's latents + GMM responsibilities, computed once (offline CMDA).

The bank holds, for each modality, the ``[N, d]`` embeddings of all samples in one shared
latent space, the Gaussian mixture fitted on one modality (the teacher's by default, as in
the paper's experiments) and its responsibilities ``[N, M]``. The entry points
(:class:`~cmda_data.CrossModalAugmentedDataset`, :class:`~cmda_data.CMDACollate`,
:class:`~cmda_data.CMDAugment`) look rows up by dataset index and build plans from them.

A bank is saved as a folder (``bank.safetensors`` + ``bank.json`` with the SHA-256 of the
tensors; never pickle) and loaded memory-mapped and verified (:meth:`EmbeddingBank.load` with
``mmap=True, verify=True``), so DataLoader workers read one copy from the page cache. A bank
built in memory can be moved to shared memory with :meth:`EmbeddingBank.share_memory_`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..core._validation import check_finite, check_int, fail
from ..exceptions import BankFormatError, CMDAError, DeviceError, ShapeError
from ..options import MixOptions, PlanOptions, resolve_fit_on, split_options
from ._build import embed_dataset
from ._checks import as_tensor, check_bank_indices, check_embeddings, check_fit_options, check_roles
from ._disk import build_to_folder
from ._fit import fit_mixture, gmm_from_state, pca_project
from ._format import bank_contents, read_bank, write_bank
from ._plan import bank_plan

__all__ = ["BankRows", "EmbeddingBank"]


@dataclass(frozen=True)
class BankRows:
    """The bank rows of some samples: ``embeddings[modality]`` ``[n, d]`` and ``responsibilities`` ``[n, M]``."""

    embeddings: Dict[str, torch.Tensor]
    responsibilities: Optional[torch.Tensor]


class EmbeddingBank:
    """Embeddings of every sample (one latent space) and GMM responsibilities.

    Build it with :meth:`from_embeddings` (latents you already have) or :meth:`build`
    (embeds a dataset with an aligner); the constructor only stores and validates.

    Args:
        embeddings: modality name -> ``[N, d]`` float tensor (row ``r`` = sample ``r``, or
            sample ``indices[r]``). Stored as float32.
        student: the student modality (the one that is mixed).
        teachers: the teacher modality or modalities.
        responsibilities: ``[N, M]`` GMM responsibilities, or None (no intra-modal weights).
        gmm: the fitted :class:`~cmda_data.GaussianMixture` (or None).
        indices: dataset indices of the rows (sorted, unique) when the bank covers a subset;
            None means row ``r`` is dataset index ``r``.
        pca: ``(mean [d], components [r, d])`` applied before the GMM, or None.
        metadata: JSON-serialisable facts (fit_on, BIC table, ...).

    Examples:
        >>> z = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
        >>> bank = EmbeddingBank({"image": z, "text": z.flip(0)}, student="image", teachers=["text"])
        >>> len(bank), bank.dim, bank.modalities
        (6, 4, ('image', 'text'))
    """

    def __init__(self, embeddings: Mapping[str, torch.Tensor], *, student: str,
                 teachers: Union[str, Sequence[str]], responsibilities: Optional[torch.Tensor] = None,
                 gmm: Any = None, indices: Optional[torch.Tensor] = None,
                 pca: Optional[Sequence[torch.Tensor]] = None, metadata: Optional[Mapping[str, Any]] = None) -> None:
        self._store(embeddings, student, teachers, responsibilities, gmm, indices, pca, metadata, values=True)

    def _store(self, embeddings: Mapping[str, torch.Tensor], student: str, teachers: Union[str, Sequence[str]],
               responsibilities: Optional[torch.Tensor], gmm: Any, indices: Optional[torch.Tensor],
               pca: Optional[Sequence[torch.Tensor]], metadata: Optional[Mapping[str, Any]], *, values: bool) -> None:
        """The constructor's body; ``values=False`` (for :meth:`load`, which checked them in the file)
        skips the NaN / inf scan, which would read a memory-mapped bank through its mapping."""
        self.embeddings = check_embeddings(embeddings, values=values)
        self.student, self.teachers = check_roles(self.embeddings, student, teachers)
        n = len(next(iter(self.embeddings.values())))
        self.responsibilities = None
        if responsibilities is not None:
            resp = as_tensor("responsibilities", responsibilities)
            if resp.ndim != 2 or resp.shape[0] != n:
                fail("responsibilities", f"a [{n}, M] tensor (one row per bank row)", resp, ShapeError)
            if values:
                check_finite("responsibilities", resp)
            self.responsibilities = resp.detach().float().contiguous()
        self.gmm = gmm
        self.indices = None if indices is None else check_bank_indices(indices, n)
        if self.indices is not None and bool(torch.equal(self.indices, torch.arange(n))):
            self.indices = None  # row r is dataset index r
        self.pca = None
        if pca is not None:
            mean, components = (as_tensor("pca", t).detach().float().contiguous() for t in pca)
            if mean.shape != (self.dim,) or components.ndim != 2 or components.shape[1] != self.dim:
                fail("pca", f"(mean [{self.dim}], components [r, {self.dim}])",
                     f"{tuple(mean.shape)} and {tuple(components.shape)}", ShapeError, raw=True)
            self.pca = (mean, components)
        self.metadata: Dict[str, Any] = dict(metadata or {})

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_embeddings(cls, embeddings: Mapping[str, torch.Tensor], *, student: str,
                        teachers: Union[str, Sequence[str]], fit_on: str = "teacher",
                        n_components: Optional[int] = None, candidates: Iterable[int] = range(1, 7),
                        reduce_dim: Optional[int] = None, fit_gmm: bool = True,
                        indices: Optional[torch.Tensor] = None, random_state: Any = 0,
                        **gmm_options: Any) -> "EmbeddingBank":
        """Store ``embeddings`` and fit the Gaussian mixture of the intra-modal weights.

        Args:
            embeddings: modality -> ``[N, d]`` tensors in one latent space.
            student: the student modality.
            teachers: the teacher modality or modalities.
            fit_on: ``"teacher"`` (the first teacher; default, as the paper's experiments),
                ``"student"`` or a modality name: whose embeddings the GMM is fitted on.
            n_components: M; None chooses it by BIC over ``candidates``, skipping the M whose
                smallest component holds fewer rows than its covariance needs (``d + 1`` for a
                full one; :func:`~cmda_data.select_n_components` is the plain criterion); the
                scores and the skipped M go to ``metadata``.
            reduce_dim: project on the first ``reduce_dim`` principal components before the
                GMM (the projection is stored and reused by :meth:`responsibilities_for`).
            fit_gmm: False stores no GMM (only ``intra=None`` can then be used).
            indices: dataset indices of the rows (a shard); None: row r is index r.
            random_state: seed of the GMM initialisation (deterministic by default).
            **gmm_options: more :class:`~cmda_data.GaussianMixture` settings
                (``covariance_type``, ``reg_covar``, ``max_iter``, ...), and
                ``max_fit_rows`` (default 20,000; None: all rows): a larger bank fits the
                choice of M and the GMM on that many random rows, then computes every
                row's responsibilities; ``progress=True`` shows bars for the slow steps.

        Examples:
            >>> g = torch.Generator().manual_seed(0)
            >>> z = torch.cat([torch.randn(20, 2, generator=g) - 4, torch.randn(20, 2, generator=g) + 4])
            >>> bank = EmbeddingBank.from_embeddings({"image": z, "text": z}, student="image",
            ...                                      teachers="text", n_components=2)
            >>> bank.responsibilities.shape, bank.n_components
            (torch.Size([40, 2]), 2)
        """
        bank = cls(embeddings, student=student, teachers=teachers, indices=indices)
        check_fit_options(dict(gmm_options, fit_gmm=fit_gmm, n_components=n_components, reduce_dim=reduce_dim,
                               random_state=random_state), "EmbeddingBank.from_embeddings")
        modality = bank.resolve_fit_on(fit_on)
        bank.metadata["fit_on"] = modality
        if not fit_gmm:
            return bank
        fitted = fit_mixture(bank.embeddings[modality], n_components=n_components, candidates=candidates,
                             reduce_dim=reduce_dim, random_state=random_state, field=modality, **gmm_options)
        bank.gmm, bank.responsibilities, bank.pca = fitted.gmm, fitted.responsibilities, fitted.pca
        bank.metadata.update(fitted.metadata)
        return bank

    @classmethod
    def build(cls, dataset: Any, aligner: Any, *, student: str, teachers: Union[str, Sequence[str]],
              fields: Optional[Mapping[str, Union[str, int]]] = None, batch_size: int = 256,
              device: Optional[Union[str, torch.device]] = None, progress: bool = True,
              indices: Optional[Iterable[int]] = None, out: Optional[Union[str, Path]] = None,
              overwrite: bool = False, **options: Any) -> "EmbeddingBank":
        """Embed every sample of ``dataset`` with ``aligner`` and fit the GMM.

        Each modality's field values of a chunk of ``batch_size`` samples are collated with
        ``default_collate`` (PIL images and strings stay lists: the aligner preprocesses them)
        and passed to ``aligner.embed(modality, batch)`` (no gradient).

        **Disk-backed build** (``out=folder``): for a bank larger than the memory can hold twice
        (a million rows and more). Every batch is written to disk as it is embedded, the GMM is
        fitted on its ``max_fit_rows`` subsample read back from the file and the
        responsibilities are written chunk by chunk, so the process holds about one batch and
        the subsample instead of every modality's table; the folder is the one :meth:`save`
        writes (byte for byte: same embeddings, same GMM, same responsibilities as
        ``build(...).save(folder)``), written into a hidden temporary folder inside it (the
        same file system) and moved into place when complete (nothing is left behind on error;
        a bank it replaces stays whole until then), and the bank returned is
        :meth:`load` ``(out)``, memory-mapped. At N = 1,000,000 x 512 with two modalities
        (``benchmarks/bench_bank.py``, 2 cores) its peak RSS was 1.02 GiB, 0.54x one modality's
        table, against 4.88 GiB (2.56x) in memory; it writes the embeddings twice (280 s against
        162 s in the same run), so a bank far smaller than the memory is faster built in memory.

        Args:
            dataset: a map-style dataset of dict or tuple samples, a Hugging Face
                ``datasets.Dataset`` (read a batch of rows at a time) or a stream
                (``datasets.IterableDataset``, torch ``IterableDataset``: row ``r`` is the
                ``r``-th sample; ``indices`` must be None).
            aligner: anything with ``embed(modality, batch) -> [n, d]`` (see
                :mod:`cmda_data.aligners`). Aligners that look rows up by dataset index
                (``PrecomputedAligner``) receive the index tensor instead of the fields.
            student: the student modality name (as the aligner knows it).
            teachers: the teacher modality name or names.
            fields: modality -> sample field (key or tuple position); default: the modality name.
            batch_size: samples per ``embed`` call.
            device: where batches go (default: the aligner's parameters' device, else CPU).
            progress: show a tqdm bar (if tqdm is installed).
            indices: embed only these dataset indices (a shard, see :meth:`concatenate`).
            out: write the bank into this folder while building it (the disk-backed build
                above) and return it loaded from there; None (default): build in memory.
            overwrite: with ``out``, replace a bank already saved there (else refused).
            **options: :meth:`from_embeddings` options (``fit_on``, ``n_components``,
                ``reduce_dim``, ``fit_gmm``, GMM settings).

        Raises:
            ValidationError: ``out`` holds a saved bank and ``overwrite`` is False, ``out`` is a
                file, or an option is unknown or invalid (all checked before anything is embedded).
        """
        options = fit_settings(options)
        if out is not None:
            folder = build_to_folder(dataset, aligner, student=student, teachers=teachers, out=out,
                                     overwrite=overwrite, fields=fields, batch_size=batch_size, device=device,
                                     progress=progress, indices=indices, options=options)
            return cls.load(folder, mmap=True, verify=False)  # just hashed while written
        if overwrite is not False:
            fail("overwrite", "False without out (it replaces a bank saved in out)", overwrite)
        roles = [student] + ([teachers] if isinstance(teachers, str) else list(teachers))
        embeddings, held = embed_dataset(dataset, aligner, roles, fields=fields, batch_size=batch_size,
                                         device=device, progress=progress, indices=indices)
        options.setdefault("progress", progress)  # bars for the GMM steps too
        return cls.from_embeddings(embeddings, student=student, teachers=teachers, indices=held, **options)

    @classmethod
    def concatenate(cls, banks: Sequence["EmbeddingBank"], *, fit_gmm: bool = True, **options: Any
                    ) -> "EmbeddingBank":
        """Join banks built on disjoint shards (``build(..., indices=...)``), then fit the GMM.

        Rows are sorted by dataset index; a bank without ``indices`` holds rows 0..N-1.
        When the result covers 0..N-1 exactly, its ``indices`` is None.

        Examples:
            >>> z = torch.eye(4)
            >>> def shard(rows):
            ...     return EmbeddingBank({"x": z[rows], "y": z[rows]}, student="x", teachers="y",
            ...                          indices=torch.tensor(rows))
            >>> a, b = shard([0, 2]), shard([1, 3])
            >>> whole = EmbeddingBank.concatenate([a, b], fit_gmm=False)
            >>> whole.indices is None, bool(torch.equal(whole.embeddings["x"], z))
            (True, True)
        """
        banks = list(banks)
        if not banks or not all(isinstance(b, EmbeddingBank) for b in banks):
            fail("banks", "a non-empty sequence of EmbeddingBank", banks)
        first = banks[0]
        for position, bank in enumerate(banks[1:], start=1):
            if (bank.modalities, bank.student, bank.teachers, bank.dim) != (
                    first.modalities, first.student, first.teachers, first.dim):
                fail(f"banks[{position}]", f"modalities {first.modalities}, student {first.student!r}, "
                     f"teachers {first.teachers} and dim {first.dim} like banks[0]",
                     f"{bank.modalities}, {bank.student!r}, {bank.teachers}, {bank.dim}", raw=True)
        held = torch.cat([b.indices if b.indices is not None else torch.arange(len(b)) for b in banks])
        order = torch.argsort(held)
        held = held[order]
        if len(held) > 1 and bool((held[1:] == held[:-1]).any()):
            dup = int(held[1:][held[1:] == held[:-1]][0])
            fail("banks", "disjoint shards", f"dataset index {dup} in more than one bank", raw=True)
        embeddings = {m: torch.cat([b.embeddings[m].cpu() for b in banks])[order] for m in first.modalities}
        identity = bool(torch.equal(held, torch.arange(len(held))))
        options.setdefault("fit_on", first.metadata.get("fit_on", "teacher"))
        return cls.from_embeddings(embeddings, student=first.student, teachers=first.teachers,
                                   indices=None if identity else held, fit_gmm=fit_gmm, **options)

    # -- facts -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(next(iter(self.embeddings.values())))

    @property
    def modalities(self) -> tuple:
        """Names of the stored modalities."""
        return tuple(self.embeddings)

    @property
    def dim(self) -> int:
        """Dimension d of the latent space."""
        return next(iter(self.embeddings.values())).shape[1]

    @property
    def device(self) -> torch.device:
        """Device of the stored tensors."""
        return next(iter(self.embeddings.values())).device

    @property
    def n_components(self) -> Optional[int]:
        """Number M of GMM components (None without responsibilities)."""
        return None if self.responsibilities is None else self.responsibilities.shape[1]

    @property
    def fit_on(self) -> Optional[str]:
        """The modality the GMM was fitted on."""
        return self.metadata.get("fit_on")

    def resolve_fit_on(self, fit_on: str) -> str:
        """``"teacher"`` -> the first teacher, ``"student"`` -> the student, else a modality name."""
        return resolve_fit_on(fit_on, self.student, self.teachers, self.modalities)

    def __repr__(self) -> str:
        return (f"EmbeddingBank(rows={len(self)}, dim={self.dim}, student={self.student!r}, "
                f"teachers={list(self.teachers)}, n_components={self.n_components}, device={self.device})")

    # -- lookups ---------------------------------------------------------------------------
    def positions(self, indices: Any) -> torch.Tensor:
        """Bank row positions of dataset ``indices`` (a LongTensor on the bank's device)."""
        idx = torch.as_tensor(indices).reshape(-1)
        if idx.dtype in (torch.bool,) or idx.is_floating_point():
            fail("indices", "integer dataset indices", indices)
        idx = idx.to(device=self.device, dtype=torch.long)
        if self.indices is None:
            bad = (idx < 0) | (idx >= len(self))
            if bool(bad.any()):
                fail("index", f"a dataset index in [0, {len(self)}) held by the bank", int(idx[bad][0]))
            return idx
        held = self.indices.to(self.device)
        pos = torch.searchsorted(held, idx).clamp_(max=len(held) - 1)
        bad = held[pos] != idx
        if bool(bad.any()):
            fail("index", "a dataset index held by this bank (it was built on a subset)", int(idx[bad][0]))
        return pos

    def embedding(self, modality: str, indices: Any = None) -> torch.Tensor:
        """``[n, d]`` embeddings of ``modality`` for dataset ``indices`` (all rows when None)."""
        if modality not in self.embeddings:
            fail("modality", "one of " + ", ".join(repr(m) for m in self.modalities), modality)
        table = self.embeddings[modality]
        return table if indices is None else table[self.positions(indices)]

    def rows(self, indices: Any) -> BankRows:
        """Embeddings of every modality and responsibilities of dataset ``indices``.

        Examples:
            >>> bank = EmbeddingBank({"x": torch.eye(3), "y": torch.eye(3)}, student="x", teachers="y")
            >>> bank.rows([2, 0]).embeddings["x"]
            tensor([[0., 0., 1.],
                    [1., 0., 0.]])
        """
        pos = self.positions(indices)
        resp = None if self.responsibilities is None else self.responsibilities[pos]
        return BankRows({m: t[pos] for m, t in self.embeddings.items()}, resp)

    def responsibilities_for(self, z: torch.Tensor) -> torch.Tensor:
        """GMM responsibilities ``[n, M]`` of new latents ``z`` (PCA applied as at fit time)."""
        if self.gmm is None:
            fail("bank.gmm", "a fitted GaussianMixture (build the bank with fit_gmm=True)", None)
        x = z.float() if self.pca is None else pca_project(z.float(), self.pca)
        return self.gmm.predict_proba(x).float()

    def plan(self, rows: Any, pool: Any = None, options: Optional[MixOptions] = None, *,
             teachers: Optional[Sequence[str]] = None, epoch: int = 0, **mix_kwargs: Any):
        """A :class:`~cmda_data.MixPlan` for teacher rows ``rows`` over candidates ``pool``.

        Both are dataset indices; ``pool`` defaults to ``rows`` (the per-batch form). The
        draws depend on ``(seed, epoch, rank, index)`` only, as in the entry points, and so
        does the plan: the entry points build theirs here too.

        Args:
            rows: dataset indices of the rows (their teachers guide the mix).
            pool: dataset indices of the candidates (default: ``rows``).
            options: the :class:`~cmda_data.MixOptions`; its fields may also be given as
                keyword arguments (``p=1.0, top_k=2``), which override it.
            teachers: the teacher modalities (default: the bank's).
            epoch: the epoch of the draws.

        Examples:
            >>> z = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
            >>> bank = EmbeddingBank({"x": z, "y": z}, student="x", teachers="y")
            >>> plan = bank.plan([0, 1, 2], intra=None, top_k=2, p=1.0)
            >>> plan.index.shape, plan.weights.sum(1)
            (torch.Size([3, 2]), tensor([1., 1., 1.]))
        """
        spec = PlanOptions.create(student=self.student, teachers=teachers or self.teachers,
                                  mix=split_options(options, mix_kwargs, "EmbeddingBank.plan"), bank=self)
        epoch = check_int("epoch", epoch, minimum=0)
        pool = rows if pool is None else pool
        return bank_plan(self, torch.as_tensor(rows).reshape(-1), torch.as_tensor(pool).reshape(-1), spec, epoch)

    # -- memory and devices ----------------------------------------------------------------
    def _tensors(self) -> Dict[str, torch.Tensor]:
        out = {f"embeddings.{m}": t for m, t in self.embeddings.items()}
        if self.responsibilities is not None:
            out["responsibilities"] = self.responsibilities
        if self.indices is not None:
            out["indices"] = self.indices
        if self.pca is not None:
            out["pca.mean"], out["pca.components"] = self.pca
        return out

    def share_memory_(self) -> "EmbeddingBank":
        """Move the tensors to shared memory (CPU only) so DataLoader workers map one copy."""
        if self.device.type != "cpu":
            fail("bank", "a CPU bank to share with worker processes (use CMDAugment for CUDA banks)",
                 f"a bank on {self.device}", DeviceError, raw=True)
        for tensor in self._tensors().values():
            tensor.share_memory_()
        return self

    def is_shared(self) -> bool:
        """Whether every stored tensor lives in shared memory."""
        return all(t.is_shared() for t in self._tensors().values())

    def to(self, device: Union[str, torch.device]) -> "EmbeddingBank":
        """A bank with the tensors on ``device`` (self when already there); the GMM is shared."""
        device = torch.device(device)
        if self.device == device:
            return self
        resp = self.responsibilities
        moved = EmbeddingBank({m: t.to(device) for m, t in self.embeddings.items()}, student=self.student,
                              teachers=self.teachers, gmm=self.gmm,
                              responsibilities=None if resp is None else resp.to(device),
                              indices=None if self.indices is None else self.indices.to(device),
                              pca=None if self.pca is None else tuple(t.to(device) for t in self.pca),
                              metadata=self.metadata)
        return moved

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: Union[str, Path], *, progress: bool = False) -> Path:
        """Write ``bank.safetensors`` and ``bank.json`` into the folder ``path`` (no pickle).

        ``bank.json`` records the size and SHA-256 of ``bank.safetensors`` and a checksum of
        its own content, which :meth:`load` verifies. ``progress=True`` shows a tqdm bar when
        the write takes over two seconds (a large bank).
        """
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            fail("path", "a folder (or a path that does not exist yet)", str(folder), raw=True)
        folder.mkdir(parents=True, exist_ok=True)
        config, tensors = bank_contents(embeddings=self.embeddings, responsibilities=self.responsibilities,
                                        indices=self.indices, pca=self.pca, gmm=self.gmm, student=self.student,
                                        teachers=list(self.teachers), metadata=self.metadata)
        write_bank(folder, config, tensors, progress=progress)
        return folder

    @classmethod
    def load(cls, path: Union[str, Path], *, mmap: Union[bool, str] = True, verify: bool = True,
             device: Optional[Union[str, torch.device]] = None) -> "EmbeddingBank":
        """Load a folder written by :meth:`save`, checked and (by default) memory-mapped.

        Memory-mapped loading (``mmap=True``, the default) is the API for DataLoader workers:
        the embeddings are views of the file's pages, so 8 workers (forked after loading, or
        each loading the folder) share one copy in the page cache instead of holding 8. Measure
        it with the unique set size (``psutil.Process().memory_full_info().uss``): RSS counts
        the shared pages in every process that touched them.

        Args:
            path: the folder.
            mmap: ``True`` (or ``"copy"``): map the tensors copy-on-write: nothing is read until
                used, pages are shared, and a write to a tensor stays in the writing process
                (it never reaches the file or another worker). ``"readonly"``: map read-only; a
                write stops the process with SIGSEGV (torch has no read-only tensors).
                ``False``: read into private memory (then :meth:`share_memory_` shares them).
            verify: check the SHA-256 of ``bank.safetensors`` and the checksum of
                ``bank.json`` recorded by :meth:`save` (reads the file once, in 1 MiB chunks:
                memory stays flat and the mapping stays shared). ``False`` skips the hash for
                very large banks; the structural checks always run.
            device: move the bank there after loading (default: CPU).

        Raises:
            BankFormatError: a file is damaged, truncated, tampered with or inconsistent (the
                message names the file: ``bank.json`` or ``bank.safetensors``).

        Examples:
            >>> import tempfile
            >>> bank = EmbeddingBank({"x": torch.eye(3), "y": torch.eye(3)}, student="x", teachers="y")
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     loaded = EmbeddingBank.load(bank.save(folder), mmap=True)
            ...     torch.equal(loaded.embeddings["x"], bank.embeddings["x"])
            True
        """
        folder = Path(path)
        config, tensors = read_bank(folder, mmap=mmap, verify=verify)
        try:
            gmm = gmm_from_state(config["gmm"], {k[4:]: v for k, v in tensors.items() if k.startswith("gmm.")})
            pca = (tensors["pca.mean"], tensors["pca.components"]) if "pca.mean" in tensors else None
            bank = cls.__new__(cls)
            bank._store({m: tensors[f"embeddings.{m}"] for m in config["modalities"]}, config["student"],
                        config["teachers"], tensors.get("responsibilities"), gmm, tensors.get("indices"), pca,
                        config["metadata"], values=False)  # checked in the file by read_bank
        except BankFormatError:
            raise
        except CMDAError as error:  # e.g. unsorted indices: the file is at fault, not the caller
            raise BankFormatError(f"{folder}: {error}") from None
        return bank if device is None else bank.to(device)


def fit_settings(options: Mapping[str, Any]) -> Dict[str, Any]:
    """The fit options of :meth:`EmbeddingBank.build`, with the defaults of
    :meth:`EmbeddingBank.from_embeddings` (declared once, in its signature) filled in, and checked."""
    bound = inspect.signature(EmbeddingBank.from_embeddings).bind_partial(**options)
    bound.apply_defaults()
    settings = {k: v for k, v in bound.arguments.items() if k not in ("indices", "gmm_options")}
    settings.update(bound.arguments.get("gmm_options", {}))
    check_fit_options(settings, "EmbeddingBank.build")
    return settings
