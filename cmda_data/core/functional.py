"""The math of CMDA as pure tensor functions (Eq. 10, Eq. 11, Algorithm 1).

Notation: teacher rows ``i`` (``n`` of them), student / partner columns ``j`` (``m`` of
them). Every function here is pure: no hidden state, no random numbers, inputs are never
modified, and the result lives on the device of the inputs.

* :func:`inter_modal_weights` -- Eq. 10: how well student sample ``j`` matches teacher ``i``.
* :func:`intra_modal_weights` -- Eq. 11: Gaussian-mixture cluster relations ("DCA").
* :func:`dca_weights` -- their product, optional top-k, row renormalisation (Alg. 1 l. 12).
* :func:`mix` -- ``X_new = W @ X`` over samples of any trailing shape (dense or sparse).
* :func:`mix_targets` -- the matching soft labels.
* :func:`topk_sparse` -- a dense weight matrix as ``(index, values)`` with ``k`` per row.

Weights are computed in float32 at least (float64 stays float64) and returned in the
input dtype. Samples in float16 / bfloat16 are accumulated in float32.

Examples:
    >>> import torch
    >>> teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> student = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    >>> w = inter_modal_weights(teacher, student)
    >>> w.round(decimals=4)
    tensor([[0.6250, 0.3750],
            [0.0000, 1.0000]])
    >>> images = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    >>> mix(w, images)
    tensor([[0.3750, 0.7500],
            [1.0000, 2.0000]])
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..exceptions import ShapeError
from . import _kernels, _numerics
from ._kernels import (  # noqa: F401 - private helpers (some used only by the tests)
    _check_float,
    _check_index,
    _check_latents,
    _check_matrix,
    _check_mix_values,
    _check_resp,
    _check_same_device,
    _check_samples,
    _compute_dtype,
    _cpu_sum,
    _flatten_trailing,
    _mix_dense,
    _mix_sparse,
    _mix_sparse_bmm,
    _normalize_rows,
    _targets_as_probabilities,
    _uniform_if_empty,
    _unit_rows,
)
from ._validation import (
    check_bool,
    check_finite,
    check_float_tensor,
    check_int,
    check_label_smoothing,
    check_option,
    check_positive_float,
    check_rank,
    check_same_size,
    check_temperature,
    fail,
)

__all__ = ["dca_weights", "inter_modal_weights", "intra_modal_weights", "mix", "mix_targets", "topk_sparse"]

SIMILARITIES = ("abs_cosine", "cosine")
NORMALIZATIONS = ("row", "legacy_broadcast", "none")
INTRA_MODES = ("soft", "hard")


# --------------------------------------------------------------------------- Eq. 10
def inter_modal_weights(teacher_z: torch.Tensor, student_z: torch.Tensor, *,
                        similarity: str = "abs_cosine", normalize: str = "row",
                        temperature: Optional[float] = None,
                        self_weight: Optional[float] = None) -> torch.Tensor:
    """Inter-modal weights of Eq. 10: teacher ``i`` x student ``j`` similarity, normalised.

    Args:
        teacher_z: teacher latents ``[n, d]`` (need not be unit length).
        student_z: student latents ``[m, d]``.
        similarity: ``"abs_cosine"`` (``|cos|``, the official code, default) or ``"cosine"``
            (cosine clamped at 0, so negative matches get weight 0; the paper's raw dot
            product can be negative, which is not a valid mixing weight).
        normalize: ``"row"`` (Eq. 10: each teacher row sums to 1), ``"legacy_broadcast"``
            (the official code's ``C / C.sum(1)``, which divides column ``j`` by the sum of
            row ``j``; needs ``n == m``) or ``"none"`` (raw scores).
        temperature: if given, a row softmax of ``score / temperature`` (an opt-in
            extension; ``normalize`` must then be ``"row"``). At least about 1.2e-38 (the
            smallest normal float32), so that ``1 / temperature`` is finite.
        self_weight: if given, the diagonal of the score matrix is set to this value before
            normalising (code parity: 1 or 10; needs ``n == m``).

    Returns:
        ``[n, m]`` weights in the dtype of ``teacher_z`` (computed in float32 or float64).
        A row whose scores are all zero becomes uniform (never NaN).

    Examples:
        >>> t = torch.tensor([[0.0, 1.0]])
        >>> s = torch.tensor([[0.0, 2.0], [1.0, -1.0], [3.0, 0.0]])
        >>> inter_modal_weights(t, s).round(decimals=4)
        tensor([[0.5858, 0.4142, 0.0000]])
        >>> inter_modal_weights(t, s, similarity="cosine").round(decimals=4)
        tensor([[1., 0., 0.]])
    """
    check_option("similarity", similarity, SIMILARITIES)
    check_option("normalize", normalize, NORMALIZATIONS)
    temperature = check_temperature("temperature", temperature)
    self_weight = check_positive_float("self_weight", self_weight, allow_zero=True, allow_none=True)
    _check_latents("teacher_z", teacher_z)
    _check_latents("student_z", student_z)
    _check_same_device("teacher_z", teacher_z, "student_z", student_z)
    check_same_size("teacher_z", teacher_z.shape[1], "student_z", student_z.shape[1],
                    what="latent dimension")
    n, m = teacher_z.shape[0], student_z.shape[0]
    if m == 0:
        fail("student_z", "at least one student sample", student_z, ShapeError)
    if temperature is not None and normalize != "row":
        fail("normalize", "'row' when temperature is given (the softmax normalises each row)",
             normalize)
    if normalize == "legacy_broadcast" and n != m:
        fail("student_z", f"{n} samples to match teacher_z (normalize='legacy_broadcast' "
             "needs a square matrix)", f"{m} samples", ShapeError, raw=True)
    if self_weight is not None and n != m:
        fail("student_z", f"{n} samples to match teacher_z (self_weight needs a square matrix)",
             f"{m} samples", ShapeError, raw=True)
    return _inter_modal_weights(teacher_z, student_z, similarity, normalize, temperature, self_weight)


def _own_entries(matrix: torch.Tensor, own: Optional[torch.Tensor]) -> torch.Tensor:
    """Row ``r``'s entry at its own sample's column: ``own[r]`` (None: the diagonal, column ``r``)."""
    if own is None:
        return matrix.diagonal()
    return matrix.gather(1, own[:, None]).reshape(-1)


def _set_own_entries(matrix: torch.Tensor, own: Optional[torch.Tensor], values: torch.Tensor) -> None:
    """Write ``values`` ``[n]`` (or a scalar) at row ``r``'s own column, in place."""
    if own is None:
        if isinstance(values, torch.Tensor):
            matrix.diagonal().copy_(values)
        else:
            matrix.diagonal().fill_(values)
        return
    values = values if isinstance(values, torch.Tensor) else torch.full_like(own, values, dtype=matrix.dtype)
    matrix.scatter_(1, own[:, None], values.to(matrix.dtype)[:, None])


def _inter_modal_weights(teacher_z: torch.Tensor, student_z: torch.Tensor, similarity: str, normalize: str,
                         temperature: Optional[float], self_weight: Optional[float],
                         own: Optional[torch.Tensor] = None, pools: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`inter_modal_weights` without argument checks (trusted, already checked inputs).

    ``own``: ``[n]`` column of each row's own sample (None: column ``r``, the diagonal).
    ``student_z`` ``[n, m, d]``: one pool per row (row ``r`` against ``student_z[r]``; ``"legacy_broadcast"``
    then divides by the row's sum, like ``"row"``); its values do not depend on the other rows.
    ``pools`` ``[n, m]``: the pools as positions into ``student_z`` ``[u, d]`` (``student_z[pools]``).
    """
    dtype = _compute_dtype(teacher_z, student_z)
    teacher = _unit_rows(teacher_z, dtype)
    per_row = pools is not None or student_z.ndim == 3
    if per_row:  # products summed along d (a batched matmul's bits change with n); unit rows: row by row
        unit = _unit_rows(student_z.reshape(-1, student_z.shape[-1]), dtype)
        unit, shape = (unit, student_z.shape[:2]) if pools is None else (unit[pools.reshape(-1)], pools.shape)
        scores = (unit.view(*shape, -1) * teacher[:, None, :]).sum(2)
    else:
        scores = teacher @ _unit_rows(student_z, dtype).T
    scores = scores.abs() if similarity == "abs_cosine" else scores.clamp_min(0)
    if self_weight is not None:
        _set_own_entries(scores, own, float(self_weight))
    if temperature is not None:
        # subtract the row max first: the logits are then <= 0 and the max is exactly 0; a finite
        # reciprocal (checked temperatures) keeps 0 * (1 / t) = 0 where 0 / t would be 0 / 0 in float32
        logits = (scores - scores.amax(1, keepdim=True)) * (1.0 / temperature)
        weights = torch.softmax(logits, dim=1)
    elif normalize == "none":
        weights = scores
    else:
        sums = scores.sum(1)
        # CPU: the all-zero-row fix only when a row needs it (same values; a sync is free on the CPU)
        if scores.device.type != "cpu" or bool((sums <= torch.finfo(scores.dtype).tiny).any()):
            scores = _uniform_if_empty(scores)
            sums = scores.sum(1)
        weights = scores / (sums[:, None] if normalize == "row" or per_row else sums[None, :])
    return weights.to(teacher_z.dtype)


# --------------------------------------------------------------------------- Eq. 11
def intra_modal_weights(resp: torch.Tensor, partner_resp: Optional[torch.Tensor] = None, *,
                        mode: str = "soft") -> torch.Tensor:
    """Intra-modal weights of Eq. 11 from Gaussian-mixture responsibilities.

    With ``c(i) = argmax resp[i]``:

    * ``"soft"`` (Eq. 11): ``w_ij = resp[i, c(j)] + resp[i, c(i)]``. For two components the
      values lie in ``[1, 2]`` (1 across clusters, ``2 * max resp[i]`` within a cluster).
    * ``"hard"`` (the official code's mask): ``w_ij = 1[c(i) == c(j)]``; the diagonal is 1
      when ``partner_resp`` is None.

    Args:
        resp: responsibilities of the rows ``[n, M]`` (rows sum to 1).
        partner_resp: responsibilities of the partners ``[m, M]``; defaults to ``resp``.
        mode: ``"soft"`` or ``"hard"``.

    Returns:
        ``[n, m]`` weights in the dtype of ``resp``.

    Examples:
        >>> gamma = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
        >>> intra_modal_weights(gamma)
        tensor([[1.8000, 1.0000],
                [1.0000, 1.4000]])
        >>> intra_modal_weights(gamma, mode="hard")
        tensor([[1., 0.],
                [0., 1.]])
    """
    check_option("mode", mode, INTRA_MODES)
    _check_resp("resp", resp)
    if partner_resp is None:
        partner_resp = resp
    else:
        _check_resp("partner_resp", partner_resp)
        _check_same_device("resp", resp, "partner_resp", partner_resp)
        check_same_size("resp", resp.shape[1], "partner_resp", partner_resp.shape[1],
                        what="number of components")
    return _intra_modal_weights(resp, partner_resp, mode)


def _intra_modal_weights(resp: torch.Tensor, partner_resp: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    """:func:`intra_modal_weights` without checks (trusted inputs); ``partner_resp`` ``[n, m, M]``: a pool per row."""
    dtype = _compute_dtype(resp, *(() if partner_resp is None else (partner_resp,)))
    rows = resp.to(dtype)
    c_rows = rows.argmax(1)
    c_cols = c_rows if partner_resp is None else partner_resp.to(dtype).argmax(-1)  # [m], or [n, m] per row
    if mode == "soft":
        cols = rows.gather(1, c_cols) if c_cols.ndim == 2 else rows.index_select(1, c_cols)
        weights = cols + rows.gather(1, c_rows[:, None])
    else:
        weights = (c_rows[:, None] == (c_cols if c_cols.ndim == 2 else c_cols[None, :])).to(dtype)
    return weights.to(resp.dtype)


# --------------------------------------------------------------------------- Alg. 1
def dca_weights(inter: torch.Tensor, intra: Optional[torch.Tensor] = None, *,
                top_k: Optional[int] = None, exclude_self: bool = False,
                renormalize: bool = True) -> torch.Tensor:
    """Combine inter- and intra-modal weights (Double Cross-Attention, Alg. 1 line 12).

    Steps: ``w = inter * intra``; ``exclude_self`` zeroes the diagonal (a row left empty keeps
    weight 1 on itself); a row that is all zero becomes uniform; ``top_k`` keeps the ``k``
    largest entries per row (``k > m`` is clamped to ``m``); ``renormalize`` divides each row
    by its sum. Alg. 1 does *not* renormalise: ``renormalize=False`` reproduces it and rows
    then sum to between 1 and 2 for soft two-component weights.

    Args:
        inter: ``[n, m]`` non-negative weights (e.g. :func:`inter_modal_weights`).
        intra: ``[n, m]`` non-negative weights (e.g. :func:`intra_modal_weights`) or None.
        top_k: keep only the ``k`` largest weights of each row.
        exclude_self: never mix a sample with itself (needs ``n == m``).
        renormalize: make every row sum to 1.

    Returns:
        Dense ``[n, m]`` weights in the dtype of ``inter``.

    Examples:
        >>> inter = torch.tensor([[0.5, 0.25, 0.25]])
        >>> intra = torch.tensor([[2.0, 1.0, 1.0]])
        >>> dca_weights(inter, intra)
        tensor([[0.6667, 0.1667, 0.1667]])
        >>> dca_weights(inter, intra, renormalize=False)
        tensor([[1.0000, 0.2500, 0.2500]])
        >>> dca_weights(inter, intra, top_k=1)
        tensor([[1., 0., 0.]])
    """
    _check_matrix("inter", inter)
    if intra is not None:
        _check_matrix("intra", intra)
        _check_same_device("inter", inter, "intra", intra)
        if intra.shape != inter.shape:
            fail("intra", f"shape {tuple(inter.shape)} to match inter", intra, ShapeError)
    top_k = check_int("top_k", top_k, minimum=1, allow_none=True)
    check_bool("exclude_self", exclude_self)
    check_bool("renormalize", renormalize)
    n, m = inter.shape
    if m == 0:
        fail("inter", "at least one column (partner)", inter, ShapeError)
    if exclude_self and n != m:
        fail("inter", "a square [n, n] matrix when exclude_self=True", inter, ShapeError)
    return _dca_weights_and_index(inter, intra, top_k, exclude_self, renormalize)[0]


def _dca_weights_and_index(inter: torch.Tensor, intra: Optional[torch.Tensor], top_k: Optional[int],
                           exclude_self: bool, renormalize: bool, own: Optional[torch.Tensor] = None,
                           ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weights, index)``: :func:`dca_weights` without argument checks (trusted, already checked inputs).

    ``own``: ``[n]`` column of each row's own sample (None: column ``r``, the diagonal).
    ``index``: the ``[n, top_k]`` columns kept by ``top_k`` in decreasing order of the weight
    before renormalising (every other entry of the row is 0), or None when ``top_k`` keeps
    every column.
    """
    n, m = inter.shape
    dtype = _compute_dtype(inter, *(() if intra is None else (intra,)))
    w = inter.to(dtype)
    w = w * intra.to(dtype) if intra is not None else w.clone()
    cpu = w.device.type == "cpu"
    # over/underflow of the product: always handled on accelerators (no read-back); on the CPU one read decides
    if intra is not None and (not cpu or bool(~torch.isfinite(w.sum()) | (w.amax(1) < torch.finfo(dtype).tiny).any())):
        w = _numerics.product_without_overflow(w, inter.to(dtype), intra.to(dtype), renormalize)
    alone = None
    if exclude_self:
        _set_own_entries(w, own, 0.0)
        alone = w.sum(1) <= 0
        _set_own_entries(w, own, alone.to(dtype))
    empty = w.sum(1) <= 0
    # CPU: skip the selections that would change nothing (same values; a sync is free on the CPU)
    if not cpu or bool(empty.any()):
        w = torch.where(empty[:, None], torch.full_like(w, 1.0 / m), w)
    fallback = empty if alone is None else alone | empty  # rows that fell back to a fixed row
    index = None
    if top_k is not None and top_k < m:
        values, index = _numerics.topk_rows(w, top_k)
        w = torch.zeros_like(w).scatter_(1, index, values)
    if renormalize:
        w = _normalize_rows(w)
    elif not cpu or bool(fallback.any()):  # degenerate (fallback) rows always sum to 1
        w = torch.where(fallback[:, None], _normalize_rows(w), w)
    return w.to(inter.dtype), index


def topk_sparse(weights: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest weights of each row, renormalised to sum 1.

    Args:
        weights: ``[n, m]`` non-negative weights.
        k: partners per row (``k > m`` is clamped to ``m``).

    Returns:
        ``(index [n, k] int64, values [n, k])`` sorted by decreasing weight; ``values`` in the
        dtype of ``weights``. A row that is all zero gets ``1/k`` on its first ``k`` columns.

    Examples:
        >>> index, values = topk_sparse(torch.tensor([[0.1, 0.6, 0.3]]), 2)
        >>> index, values
        (tensor([[1, 2]]), tensor([[0.6667, 0.3333]]))
    """
    _check_matrix("weights", weights)
    k = check_int("k", k, minimum=1)
    if weights.shape[1] == 0:
        fail("weights", "at least one column (partner)", weights, ShapeError)
    k = min(k, weights.shape[1])
    w = weights.to(_compute_dtype(weights))
    values, index = w.topk(k, dim=1)
    return index, _normalize_rows(values).to(weights.dtype)


# --------------------------------------------------------------------------- mixing
def mix(weights: torch.Tensor, samples: torch.Tensor, *,
        index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """New samples as weighted sums of real ones: ``out[i] = sum_j W[i, j] * samples[j]``.

    Dense: ``weights`` is ``[n, m]`` and the result is one matrix product over the flattened
    samples. Sparse: ``index [n, k]`` holds positions into ``samples`` and ``weights [n, k]``
    their weights; only the chosen partners are read (the dense ``[n, m]`` matrix is never
    built). Convex weights (non-negative, rows summing to 1) give convex combinations.

    Args:
        weights: ``[n, m]`` (dense) or ``[n, k]`` (with ``index``), finite.
        samples: ``[m, *S]`` floating-point samples of any trailing shape ``S`` (images,
            vectors, ...). Integer token ids cannot be interpolated: mix embeddings instead.
        index: ``[n, k]`` int64 positions into ``samples`` (sparse mixing).

    Returns:
        ``[n, *S]`` in the dtype (and memory layout) of ``samples``. float16 / bfloat16 are
        accumulated in float32. Gradients flow to ``samples`` and ``weights``. On Linux a CPU
        result of at least 32 MiB is written to memory advised for transparent huge pages
        (fewer page faults, same values; ``CMDA_HUGE_PAGES=0`` turns that off).

    Examples:
        >>> x = torch.arange(6.0).reshape(3, 2)
        >>> mix(torch.tensor([[0.5, 0.5, 0.0]]), x)
        tensor([[1., 2.]])
        >>> mix(torch.tensor([[0.25, 0.75]]), x, index=torch.tensor([[0, 2]]))
        tensor([[3., 4.]])
    """
    _check_samples(samples)
    check_float_tensor("weights", weights, finite=False)
    check_rank("weights", weights, 2)
    _check_same_device("samples", samples, "weights", weights)
    m = samples.shape[0]
    if index is None:
        if weights.shape[1] != m:
            fail("samples", f"{weights.shape[1]} samples along dim 0 to match the columns of "
                 f"weights {tuple(weights.shape)}", samples, ShapeError)
    else:
        _check_index(index, weights, m, samples, check_range=False)
    return _mix_checked(weights, samples, index, m)


def _mix_checked(weights: torch.Tensor, samples: torch.Tensor, index: Optional[torch.Tensor], m: int) -> torch.Tensor:
    """The value checks of :func:`mix` (finite weights and samples, index range), then :func:`_mix`.

    The checks are reductions read back in one transfer (:func:`_check_mix_values`). On the
    CPU, sparse mixing checks the samples while it mixes them (the column-blocked kernel sums
    each block while the block is in cache: no second pass over the samples in memory); the
    samples are then refused after mixing, with the same error, when that sum is not finite.
    """
    if (index is None or samples.device.type != "cpu"
            or _kernels._sparse_route("cpu", m, index.shape[1]) != "embedding_bag"):
        _check_mix_values(weights, samples, index, m)  # reductions only, read back in one transfer
        return _mix(weights, samples, index)
    _check_mix_values(weights, None, index, m)  # weights and index first: the kernel reads by index
    flat, restore = _flatten_trailing(samples)
    out, total = _kernels._mix_sparse_cpu(index.long(), weights.to(flat.dtype), flat, check=True)
    if total is None:
        total = _cpu_sum(samples)
    if not math.isfinite(total):
        check_finite("samples", samples)  # a finite sum can overflow: look element-wise
    return restore(out)


def _mix(weights: torch.Tensor, samples: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`mix` without argument checks (trusted weights; callers check the samples)."""
    flat, restore = _flatten_trailing(samples)
    if index is not None:
        out = _mix_sparse(index, weights.to(flat.dtype), flat)
    else:
        out = _mix_dense(weights, flat)
    return restore(out)


# --------------------------------------------------------------------------- labels
def mix_targets(weights: torch.Tensor, targets: torch.Tensor, num_classes: Optional[int] = None,
                label_smoothing: float = 0.0, *,
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft labels of mixed samples: the same weights applied to (smoothed) one-hot targets.

    Each weight row is first divided by its sum, so the labels are distributions even for
    ``renormalize=False`` weights.

    Args:
        weights: ``[n, m]`` (dense) or ``[n, k]`` (with ``index``), non-negative, rows with a
            positive sum.
        targets: class indices ``[m]`` (needs ``num_classes``) or a float ``[m, C]`` tensor of
            one-hot, multi-hot (normalised to sum 1 first) or probability rows.
        num_classes: number of classes ``C``.
        label_smoothing: ``eps`` in ``[0, 1)``: ``y * (1 - eps) + eps / C``.
        index: ``[n, k]`` positions into ``targets`` (sparse mixing).

    Returns:
        ``[n, C]`` float32 rows that sum to 1.

    Examples:
        >>> mix_targets(torch.tensor([[0.75, 0.25]]), torch.tensor([0, 2]), num_classes=3)
        tensor([[0.7500, 0.0000, 0.2500]])
    """
    label_smoothing = check_label_smoothing("label_smoothing", label_smoothing)
    num_classes = check_int("num_classes", num_classes, minimum=1, allow_none=True)
    _check_matrix("weights", weights)
    probs = _targets_as_probabilities(targets, num_classes, label_smoothing)
    _check_same_device("weights", weights, "targets", probs)
    m = probs.shape[0]
    if index is None:
        if weights.shape[1] != m:
            fail("targets", f"{weights.shape[1]} rows to match the columns of weights "
                 f"{tuple(weights.shape)}", targets, ShapeError)
    else:
        _check_index(index, weights, m, probs)
    sums = weights.sum(1, keepdim=True)
    if weights.numel() and bool((sums <= 0).any()):
        fail("weights", "every row to have a positive sum", f"{int((sums <= 0).sum())} all-zero rows",
             raw=True)
    return _mix_targets(weights, probs, index)


def _mix_targets(weights: torch.Tensor, probs: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`mix_targets` on checked probability rows (``_targets_as_probabilities``), trusted weights."""
    work = _compute_dtype(weights)
    w = _normalize_rows(weights.to(work))
    probs = probs.to(work)
    if index is None:
        out = w @ probs
    else:
        n, k = index.shape  # probs[index] as one index_select (same values, 3x faster on the CPU)
        gathered = probs.index_select(0, index.reshape(-1).long()).view(n, k, probs.shape[1])
        out = torch.bmm(w.unsqueeze(1), gathered).squeeze(1)
    return _normalize_rows(out).float()
