"""Row-wise numerics that must not overflow (private).

* :func:`scaled_product` -- ``a * b`` of two non-negative weight matrices, each row scaled
  by its maximum first: the product of two rows near ``1e20`` stays finite in float32 (the
  rows are then renormalised, so the scale does not matter).
* :func:`far_log_resp` -- Gaussian-mixture responsibilities of points so far from every
  component that the Mahalanobis distances overflow (or lose every digit of their
  differences): ``maha_k - maha_j`` is computed directly, as ``(y_k - y_j) . (y_k + y_j)``
  on rows scaled to ``max |x| = 1``, and the responsibilities are a log-sum-exp over those
  differences. The result is the limit the exact formula tends to (one-hot on the component
  that is nearest in its own metric), never NaN.
* :func:`topk_rows` -- ``torch.topk`` over the rows of a wide CPU matrix, bitwise, faster.

Nothing here is public API.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from ._validation import fail

__all__ = ["FAR_MAHALANOBIS", "far_log_resp", "far_rows", "product_without_overflow", "scaled_product",
           "topk_rows"]

#: rows whose smallest ``-log N(x | k)`` exceeds this take :func:`far_log_resp` (at 1e8 the
#: direct formula keeps about 8 digits of the differences; scikit-learn's values are kept below it)
FAR_MAHALANOBIS = 1e8


def scaled_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` scaled per row to a maximum of 1: finite, and without underflow to an all-zero row.

    Each factor is divided by its row maximum first and the product is taken in float64 (exact
    for float32 factors), then divided by its own row maximum. All-zero rows stay zero. Equal to
    ``a * b`` up to one positive factor per row; returned in the dtype of ``a``.
    """
    def unit(w: torch.Tensor) -> torch.Tensor:
        w = w.double()
        top = w.amax(1, keepdim=True)
        return w / torch.where(top > 0, top, torch.ones_like(top))

    return unit(unit(a) * unit(b)).to(a.dtype)


def product_without_overflow(w: torch.Tensor, inter: torch.Tensor, intra: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """Rows of ``w = inter * intra`` that overflowed (or underflowed to zero) recomputed by :func:`scaled_product`.

    Renormalised rows do not depend on a row's scale. Without ``renormalize`` the raw values are
    the result: a row that overflows cannot be represented and is refused; one that underflows
    is what the product is (it falls back to a uniform row).
    """
    overflow = ~torch.isfinite(w).all(1, keepdim=True)
    if not renormalize:
        if bool(overflow.any()):
            rows = overflow.flatten().nonzero().flatten().tolist()
            fail("intra", f"weights whose product with inter is finite in {w.dtype} when renormalize=False",
                 f"a product that overflows in row(s) {rows[:8]} (max inter {float(inter.amax()):.4g}, max intra "
                 f"{float(intra.amax()):.4g}; pass renormalize=True or scale the weights)", raw=True)
        return w
    redo = overflow | (w.amax(1, keepdim=True) < torch.finfo(w.dtype).tiny)  # overflow, zero or subnormal rows
    return torch.where(redo, scaled_product(inter, intra), w)


def _linear_maps(means: torch.Tensor, chol: torch.Tensor, kind: str, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(u P_k [n, M, d], mu_k P_k [M, d])``: the whitening map of every component."""
    n_components, d = means.shape
    if kind == "full":
        return torch.einsum("nd,kde->nke", u, chol), torch.einsum("kd,kde->ke", means, chol)
    if kind == "tied":
        return (u @ chol)[:, None, :].expand(-1, n_components, -1), means @ chol
    scale = chol if kind == "diag" else chol[:, None].expand(n_components, d)
    return u[:, None, :] * scale[None], means * scale


def far_log_resp(X: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, chol: torch.Tensor,
                 kind: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log p(x) [n], log responsibilities [n, M])`` without overflow, for rows far from the mixture.

    ``log p(x)`` is ``-inf`` only when the true value lies below the float range; the
    responsibilities are finite, non-negative rows that sum to 1.
    """
    n, d = X.shape
    n_components = means.shape[0]
    s = X.abs().amax(1).clamp_min(1.0)  # [n]
    u = X / s[:, None]
    inv_s = (1.0 / s)[:, None, None]
    if kind in ("full", "tied"):
        log_det = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    else:
        log_det = chol.log().sum(1) if kind == "diag" else d * chol.log()
    log_det = log_det.expand(n_components)
    log_w = weights.log()
    valid = torch.isfinite(log_w)
    c = torch.where(valid, log_w + log_det, torch.zeros_like(log_w))
    eye = torch.eye(n_components, dtype=torch.bool, device=X.device)
    out_resp = X.new_empty((n, n_components))
    out_norm = X.new_empty((n,))
    rows_per_chunk = max(1, (1 << 22) // max(1, n_components * n_components * d))
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(n, start + rows_per_chunk))
        V, b = _linear_maps(means, chol, kind, u[rows])
        Y = V - b[None] * inv_s[rows]  # y_k / s: [r, M, d], entries of order |P|
        diff = V[:, :, None] - V[:, None] - (b[:, None] - b[None])[None] * inv_s[rows, :, :, None]
        total = V[:, :, None] + V[:, None] - (b[:, None] + b[None])[None] * inv_s[rows, :, :, None]
        sr = s[rows][:, None, None]
        D = sr * (sr * (diff * total).sum(-1))  # [r, M, M]: maha_k - maha_j (may be +-inf, never NaN)
        terms = 0.5 * D + c[None, None, :] - c[None, :, None]  # row k, column j
        terms = torch.where(valid[None, None, :], terms, torch.full_like(terms, -math.inf))
        terms = torch.where(eye[None], torch.zeros_like(terms), terms)
        log_resp = -torch.logsumexp(terms, dim=2)
        log_resp = torch.where(valid[None, :], log_resp, torch.full_like(log_resp, -math.inf))
        best = log_resp.argmax(1)
        y_best = Y.gather(1, best[:, None, None].expand(-1, 1, d))[:, 0]
        maha = s[rows] * (s[rows] * (y_best * y_best).sum(1))
        log_gauss = -0.5 * (d * math.log(2 * math.pi) + maha) + log_det[best]
        out_norm[rows] = log_gauss + log_w[best] - log_resp.gather(1, best[:, None])[:, 0]
        out_resp[rows] = log_resp
    return out_norm, out_resp


def far_rows(weighted: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: rows of ``log w_k + log N(x | k)`` that the direct formula cannot resolve."""
    best = weighted.amax(1)
    return ~torch.isfinite(best) | (best < -FAR_MAHALANOBIS)


# CPU top-k of wide rows. torch.topk over a row of m = 256 costs ~10x its cost over 64 (one
# batch's plan: ~0.6 ms of a ~2 ms plan at B = 256, k = 8); the k largest entries lie in the k
# blocks of _TOPK_BLOCK columns with the largest maxima, so a top-k over the block maxima and
# one over the k * _TOPK_BLOCK entries of those blocks find them (3x faster at m = 256).
_TOPK_BLOCK = 4
_TOPK_MIN_COLUMNS = 128


def topk_rows(w: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``w.topk(k, dim=1)`` of a 2-D ``w`` (finite, ``k <= m``): the same values and indices, bitwise.

    Wide CPU rows go through the block maxima (see ``_TOPK_BLOCK``). The result is then
    checked to be the only answer: ``k`` strictly decreasing values and no other entry as
    large as the k-th (a row with a tie has several; ``torch.topk`` breaks ties by its own
    rule). With a tie in any row, the whole matrix goes to ``torch.topk``.
    """
    n, m = w.shape
    if w.device.type != "cpu" or m < max(_TOPK_MIN_COLUMNS, 4 * k * _TOPK_BLOCK) or not w.is_contiguous():
        return w.topk(k, dim=1)
    b = _TOPK_BLOCK
    full = m - m % b
    blocks = w.narrow(1, 0, full).view(n, full // b, b).amax(2).topk(k, dim=1, sorted=False)[1]
    cols = (blocks.unsqueeze(2) * b + torch.arange(b, device=w.device)).reshape(n, k * b)
    if full < m:  # the columns of the last, partial block are always candidates
        cols = torch.cat([cols, torch.arange(full, m, device=w.device).expand(n, m - full)], 1)
    values, at = w.gather(1, cols).topk(k, dim=1)
    # k strictly decreasing values, and only k entries >= the k-th: the row's unique top-k (a
    # missed entry of the true top-k would be a (k+1)-th entry >= the k-th value found)
    unique = (values[:, :-1] > values[:, 1:]).all(1) & ((w >= values[:, -1:]).sum(1) == k)
    if not bool(unique.all()):
        return w.topk(k, dim=1)
    return values, cols.gather(1, at)
