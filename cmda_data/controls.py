"""Uninformative-teacher controls: does the teacher matter on your data?

CMDA's promise over Mixup is that the *teacher* picks better partners. The honest test of
that promise runs the same pipeline twice, once with the real teacher and once with a
teacher that carries no information, and compares the two on the same seeds (see
:mod:`cmda_data.stats`). Everything else (loss weights, number of generated rows, the
form of the weights, optimiser steps) stays the same, so the difference is the teacher's.

* :func:`random_teacher`: each teacher row becomes a random unit vector of the same
  dimension, fixed per sample. Nothing about the pairing or the teacher survives.
* :func:`shuffled_teacher`: the teacher rows are permuted across samples (real captions,
  wrong pairing; no row keeps its own). The teacher's cluster structure survives, the
  pairing does not.

Both take an :class:`~cmda_data.EmbeddingBank` (offline CMDA: :class:`~cmda_data.CMDACollate`,
:class:`~cmda_data.CrossModalAugmentedDataset`) and return a new bank, the input untouched;
or an aligner (online CMDA: :class:`~cmda_data.CMDAugment`) and return a wrapper aligner
whose teacher latents are replaced the same way (the wrapped aligner is untouched and
keeps training as before: only the latents the mixing sees change).

Examples:
    >>> import torch
    >>> from cmda_data import EmbeddingBank
    >>> g = torch.Generator().manual_seed(0)
    >>> z = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=1)
    >>> bank = EmbeddingBank({"image": z, "text": z.clone()}, student="image", teachers="text")
    >>> control = random_teacher(bank, seed=0)
    >>> bool(torch.equal(control.embedding("image"), bank.embedding("image")))  # the student is kept
    True
    >>> bool(torch.allclose(control.embedding("text").norm(dim=1), torch.ones(8)))  # unit rows
    True
    >>> control.metadata["control"]["kind"]
    'random_teacher'
    >>> sorted(shuffled_teacher(bank, seed=0).embedding("text").tolist()) == sorted(z.tolist())
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .bank._bank import EmbeddingBank
from .bank._build import embeds_by_index
from .bank._fit import fit_mixture
from .core._seeding import hash_ints
from .core._validation import fail
from .exceptions import ShapeError

__all__ = ["RandomTeacherAligner", "ShuffledTeacherAligner", "random_teacher", "shuffled_teacher"]

_STREAM_RANDOM = 0xC0_7701
_STREAM_SHUFFLE = 0xC0_7702
_GMM_KEYS = ("covariance_type", "tol", "reg_covar", "max_iter", "n_init", "init_params")


def random_teacher(source: Any, *, seed: int = 0, teachers: Optional[Union[str, Sequence[str]]] = None) -> Any:
    """The same bank (or aligner) with teacher latents that carry no information.

    Each teacher row becomes a random unit vector of the bank's dimension, drawn from
    ``(seed, row)`` only (fixed per sample). When the bank's GMM was fitted on a teacher it
    is refitted on the random latents with the same settings and the same number of
    components, so the intra-modal weights (Eq. 11) carry no teacher information either.

    Args:
        source: an :class:`~cmda_data.EmbeddingBank`, or an aligner (``embed(modality,
            batch)``) for online CMDA.
        seed: the seed of the random latents.
        teachers: the teacher modalities to replace (default: all of the bank's; required
            for an aligner).

    Returns:
        A new :class:`~cmda_data.EmbeddingBank` (``metadata["control"]`` records the
        control) or a :class:`RandomTeacherAligner`.
    """
    seed = _check_seed(seed)
    if isinstance(source, EmbeddingBank):
        chosen = _bank_teachers(source, teachers)
        embeddings = dict(source.embeddings)
        for position, modality in enumerate(chosen):
            n, d = source.embeddings[modality].shape
            gen = torch.Generator().manual_seed(hash_ints(_STREAM_RANDOM, seed, position) >> 1)
            z = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
            embeddings[modality] = z.to(source.device)
        return _new_bank(source, embeddings, chosen, "random_teacher", seed, permutation=None)
    return RandomTeacherAligner(source, teachers=teachers, seed=seed)


def shuffled_teacher(source: Any, *, seed: int = 0, teachers: Optional[Union[str, Sequence[str]]] = None) -> Any:
    """The same bank (or aligner) with the teacher rows permuted across samples.

    Row ``i``'s teacher becomes the teacher of another sample: one random cycle through all
    rows (Sattolo's algorithm), so no row keeps its own. Responsibilities of a GMM fitted
    on a teacher move with their rows (the GMM itself is unchanged: same points).

    Args:
        source: an :class:`~cmda_data.EmbeddingBank` (at least 2 rows), or an aligner for
            online CMDA (the rows of each embedded batch are permuted the same way).
        seed: the seed of the permutation.
        teachers: the teacher modalities to permute (default: all of the bank's; required
            for an aligner). All of them move with the same permutation.

    Returns:
        A new :class:`~cmda_data.EmbeddingBank` (``metadata["control"]`` records the
        control) or a :class:`ShuffledTeacherAligner`.
    """
    seed = _check_seed(seed)
    if isinstance(source, EmbeddingBank):
        chosen = _bank_teachers(source, teachers)
        if len(source) < 2:
            fail("bank", "at least 2 rows to permute", f"a bank of {len(source)} row", ShapeError, raw=True)
        perm = derangement(len(source), hash_ints(_STREAM_SHUFFLE, seed) >> 1).to(source.device)
        embeddings = dict(source.embeddings)
        for modality in chosen:
            embeddings[modality] = source.embeddings[modality][perm].contiguous()
        return _new_bank(source, embeddings, chosen, "shuffled_teacher", seed, permutation=perm)
    return ShuffledTeacherAligner(source, teachers=teachers, seed=seed)


def derangement(n: int, seed: int) -> torch.Tensor:
    """A random cyclic permutation of ``range(n)`` (Sattolo's algorithm): no fixed point for n >= 2.

    Examples:
        >>> perm = derangement(6, seed=3)
        >>> sorted(perm.tolist()) == list(range(6)), bool((perm != torch.arange(6)).all())
        (True, True)
    """
    rng = np.random.default_rng(seed)
    items = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: Sattolo (one n-cycle), not Fisher-Yates
        items[i], items[j] = items[j], items[i]
    return torch.from_numpy(items).long()


# ------------------------------------------------------------------------------- online wrappers
class _TeacherControl:
    """An aligner that forwards everything to ``aligner`` but replaces the teacher latents."""

    kind = ""

    def __init__(self, aligner: Any, *, teachers: Union[str, Sequence[str]], seed: int = 0) -> None:
        self.aligner = aligner
        self.teachers = _aligner_teachers(aligner, teachers)
        self.seed = _check_seed(seed)

    @property
    def embeds_by_index(self) -> bool:
        """As the wrapped aligner (a precomputed aligner is given dataset indices)."""
        return embeds_by_index(self.aligner)

    def __getattr__(self, name: str) -> Any:  # dim, modalities, parameters(), ...
        if name == "aligner":  # not set yet (during unpickling)
            raise AttributeError(name)
        return getattr(self.aligner, name)

    def embed(self, modality: str, batch: Any) -> torch.Tensor:
        """The wrapped aligner's latents, with the teacher rows replaced (see the class)."""
        z = self.aligner.embed(modality, batch)
        if modality not in self.teachers:
            return z
        return self._replace(z, row_keys(batch, len(z)))

    def _replace(self, z: torch.Tensor, keys: List[int]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.aligner!r}, teachers={list(self.teachers)}, seed={self.seed})"


class RandomTeacherAligner(_TeacherControl):
    """Online :func:`random_teacher`: each teacher input gets a random unit latent.

    The latent of a teacher sample depends on ``(seed, the sample's content)`` only (a
    BLAKE2 hash of its bytes, or of its dataset index for a precomputed aligner), so the
    same sample gets the same latent in every batch and epoch, whatever the aligner learns.
    """

    kind = "random_teacher"

    def _replace(self, z: torch.Tensor, keys: List[int]) -> torch.Tensor:
        rows = [torch.randn(z.shape[1], generator=torch.Generator().manual_seed(hash_ints(
            _STREAM_RANDOM, self.seed, key) >> 1)) for key in keys]
        out = torch.nn.functional.normalize(torch.stack(rows), dim=1) if rows else torch.zeros(0, z.shape[1])
        return out.to(device=z.device, dtype=z.dtype)


class ShuffledTeacherAligner(_TeacherControl):
    """Online :func:`shuffled_teacher`: the teacher latents of each batch are permuted.

    The permutation is one random cycle through the batch rows (no row keeps its own
    teacher), drawn from ``(seed, the batch's content)``: the same batch is permuted the
    same way in every call.
    """

    kind = "shuffled_teacher"

    def _replace(self, z: torch.Tensor, keys: List[int]) -> torch.Tensor:
        if len(z) < 2:
            return z
        perm = derangement(len(z), hash_ints(_STREAM_SHUFFLE, self.seed, *keys) >> 1)
        return z[perm.to(z.device)]


def row_keys(batch: Any, n: int) -> List[int]:
    """One 64-bit key per sample of ``batch`` from its content (tensor rows, strings, token dicts).

    Examples:
        >>> a = row_keys(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 2)
        >>> a == row_keys(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 2), a[0] != a[1]
        (True, True)
        >>> row_keys(["a cat", "a dog"], 2)[0] == row_keys(["a cat"], 1)[0]
        True
    """
    if isinstance(batch, Mapping):  # e.g. a tokenizer's output: combine the keys of every field
        per_field = [row_keys(batch[k], n) for k in sorted(batch, key=str)]
        return [hash_ints(*column) for column in zip(*per_field)] if per_field else [0] * n
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    if isinstance(batch, torch.Tensor):
        rows = batch.detach().reshape(len(batch), -1).cpu().contiguous()
        raw = rows.view(torch.uint8) if rows.numel() else rows.to(torch.uint8)
        data = raw.numpy()
        keys = [_digest(data[i].tobytes()) for i in range(len(data))]
    elif isinstance(batch, (list, tuple)):
        keys = [_digest(_item_bytes(item)) for item in batch]
    else:
        fail("batch", "a tensor, an array, a list of samples or a dict of batched fields", batch)
    if len(keys) != n:
        fail("batch", f"{n} samples (the aligner's output rows)", f"{len(keys)}", ShapeError, raw=True)
    return keys


def _item_bytes(item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, (torch.Tensor, np.ndarray)):
        return np.ascontiguousarray(torch.as_tensor(item).detach().cpu().numpy()).tobytes()
    tobytes = getattr(item, "tobytes", None)  # e.g. a PIL image
    return tobytes() if callable(tobytes) else repr(item).encode("utf-8")


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# ------------------------------------------------------------------------------- bank helpers
def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        fail("seed", "an int", seed)
    return int(seed)


def _bank_teachers(bank: EmbeddingBank, teachers: Any) -> Tuple[str, ...]:
    if teachers is None:
        return tuple(bank.teachers)
    chosen = (teachers,) if isinstance(teachers, str) else tuple(teachers)
    for modality in chosen:
        if modality not in bank.teachers:
            fail("teachers", "teacher modalities of the bank (" + ", ".join(map(repr, bank.teachers)) + ")", modality)
    if not chosen:
        fail("teachers", "at least one teacher modality", teachers)
    return chosen


def _aligner_teachers(aligner: Any, teachers: Any) -> Tuple[str, ...]:
    if not callable(getattr(aligner, "embed", None)):
        fail("source", "an EmbeddingBank or an aligner with embed(modality, batch)", aligner)
    chosen = (teachers,) if isinstance(teachers, str) else tuple(teachers or ())
    if not chosen or not all(isinstance(t, str) and t for t in chosen):
        fail("teachers", "the teacher modality name or names (required for an aligner)", teachers)
    return chosen


def _new_bank(bank: EmbeddingBank, embeddings: dict, chosen: Tuple[str, ...], kind: str, seed: int, *,
              permutation: Optional[torch.Tensor]) -> EmbeddingBank:
    """The control bank: new teacher rows, the GMM's responsibilities made to match them."""
    fit_on = bank.fit_on
    resp, gmm, pca = bank.responsibilities, bank.gmm, bank.pca
    metadata = dict(bank.metadata)
    if resp is not None and (fit_on is None or fit_on in chosen):
        if permutation is not None:  # the same points in another order: the GMM still fits them
            resp = resp[permutation].contiguous()
        elif gmm is not None:  # new points: refit with the same settings and M
            options = {key: getattr(gmm, key) for key in _GMM_KEYS if hasattr(gmm, key)}
            fitted = fit_mixture(embeddings[fit_on or chosen[0]].cpu(), n_components=resp.shape[1], candidates=(),
                                 reduce_dim=metadata.get("reduce_dim"), random_state=seed, **options)
            gmm, resp, pca = fitted.gmm, fitted.responsibilities.to(bank.device), fitted.pca
            metadata.update({k: v for k, v in fitted.metadata.items() if k != "criterion"})
        else:  # responsibilities without a GMM: break their link to the rows as well
            order = derangement(len(resp), hash_ints(_STREAM_RANDOM, seed, 1 << 20) >> 1).to(resp.device)
            resp = resp[order].contiguous()
    metadata["control"] = {"kind": kind, "seed": seed, "teachers": list(chosen),
                           "gmm": "refitted" if gmm is not bank.gmm else "kept"}
    return EmbeddingBank(embeddings, student=bank.student, teachers=bank.teachers, responsibilities=resp, gmm=gmm,
                         indices=bank.indices, pca=pca, metadata=metadata)
