"""Validation of what an EmbeddingBank stores (private)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict

import numpy as np
import torch

from ..core._validation import check_finite, describe, fail
from ..exceptions import ShapeError

__all__ = ["as_tensor", "check_bank_indices", "check_embeddings", "check_roles"]


def as_tensor(name: str, value: Any) -> torch.Tensor:
    """``value`` as a tensor (numpy arrays are wrapped without a copy)."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
    except ImportError:  # pragma: no cover
        pass
    fail(name, "a torch.Tensor or numpy array", value)


def check_embeddings(embeddings: Any) -> Dict[str, torch.Tensor]:
    """modality -> float32 ``[N, d]``: same N and d everywhere, finite values."""
    if not isinstance(embeddings, Mapping) or not embeddings:
        fail("embeddings", "a non-empty dict modality name -> [N, d] tensor", embeddings)
    out: Dict[str, torch.Tensor] = {}
    first = None
    for modality, value in embeddings.items():
        if not isinstance(modality, str) or not modality:
            fail("embeddings", "modality names as non-empty strings", modality)
        name = f"embeddings[{modality!r}]"
        tensor = as_tensor(name, value)
        if not tensor.is_floating_point():
            fail(name, "a floating-point [N, d] tensor", tensor)
        if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
            fail(name, "a non-empty [N, d] tensor", tensor, ShapeError)
        check_finite(name, tensor)
        if first is None:
            first = (modality, tensor.shape)
        elif tensor.shape != first[1]:
            fail(name, f"shape {tuple(first[1])} like embeddings[{first[0]!r}] (same N samples, one latent space)",
                 f"shape {tuple(tensor.shape)}", ShapeError, raw=True)
        out[modality] = tensor.detach().float().contiguous()
    return out


def check_roles(embeddings: Mapping[str, torch.Tensor], student: Any, teachers: Any) -> tuple:
    """Validate the student and teacher modality names against the stored ones."""
    known = ", ".join(repr(m) for m in embeddings)
    if student not in embeddings:
        fail("student", f"a modality of the bank ({known})", student)
    teachers = (teachers,) if isinstance(teachers, str) else tuple(teachers or ())
    if not teachers:
        fail("teachers", "at least one teacher modality", teachers)
    for teacher in teachers:
        if teacher not in embeddings:
            fail("teachers", f"modalities of the bank ({known})", teacher)
        if teacher == student:
            fail("teachers", f"modalities other than the student {student!r}", teacher)
    if len(set(teachers)) != len(teachers):
        fail("teachers", "distinct modalities", list(teachers))
    return student, teachers


def check_bank_indices(indices: Any, n: int) -> torch.Tensor:
    """Dataset indices of the rows: ``[N]`` integers, sorted and unique."""
    if isinstance(indices, (list, tuple, range)):
        indices = torch.tensor(list(indices))
    idx = as_tensor("indices", indices)
    if idx.is_floating_point() or idx.dtype == torch.bool or idx.ndim != 1 or len(idx) != n:
        fail("indices", f"{n} integer dataset indices (one per row)", idx)
    idx = idx.long().cpu()
    if n > 1 and not bool((idx[1:] > idx[:-1]).all()):
        fail("indices", "sorted unique dataset indices", describe(idx), raw=True)
    if n and int(idx[0]) < 0:
        fail("indices", "dataset indices >= 0", int(idx[0]))
    return idx.contiguous()
