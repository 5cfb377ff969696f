"""EM math for Gaussian mixtures (private): pure torch functions, no state, no global RNG.

:class:`cmda_data.core.mixture.GaussianMixture` holds the configuration and calls these.
The formulas follow scikit-learn's ``sklearn.mixture`` (same parametrisation, same
``10 * eps`` guard on component sizes, same upper-triangular ``precisions_cholesky``
with ``P @ P.T`` equal to the precision matrix), written for torch and vectorised over
components: batched Cholesky factorisations and triangular solves on ``[M, d, d]``
stacks, and one matrix product for all components in the E-step.

Shapes: ``X`` is ``[n, d]``, ``resp`` is ``[n, M]``, ``means`` is ``[M, d]``.
Covariances, precisions and their Cholesky factors have the shape of their
``covariance_type``: full ``[M, d, d]``, tied ``[d, d]``, diag ``[M, d]``,
spherical ``[M]``. Every function keeps the dtype and device of its inputs; callers
pass float64.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..exceptions import ValidationError
from . import _numerics
from ._validation import fail

__all__ = [
    "COVARIANCE_TYPES",
    "INIT_PARAMS",
    "covariances_from_precisions_cholesky",
    "e_step",
    "estimate_gaussian_parameters",
    "estimate_log_gaussian_prob",
    "estimate_log_prob_resp",
    "initial_resp",
    "kmeans",
    "kmeans_plusplus",
    "log_det_cholesky",
    "precisions_cholesky_from_covariances",
    "precisions_cholesky_from_precisions",
    "precisions_from_cholesky",
]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")

#: elements of one temporary ``[rows, M, d]`` block: small on CPU so it stays in cache
#: (3-4x faster than one big temporary), large on GPUs where kernel launches dominate
_CPU_CHUNK_ELEMENTS = 1 << 18
_GPU_CHUNK_ELEMENTS = 1 << 24
#: but never fewer rows than this: the matrix products of wide data (M * d >= 1024) need tall
#: blocks (d = 512, M = 4 on 2 cores: 2x faster E- and M-steps at 2048 rows than at 256)
_MIN_CHUNK_ROWS = 2048


def _row_chunks(X: torch.Tensor, width: int):
    """Row slices of ``X`` so that ``rows * width`` stays near the chunk budget of its device."""
    n = X.shape[0]
    budget = _CPU_CHUNK_ELEMENTS if X.device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    step = max(_MIN_CHUNK_ROWS, budget // max(1, width))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


# ----------------------------------------------------------------------------- M-step


def estimate_gaussian_parameters(
    X: torch.Tensor, resp: torch.Tensor, reg_covar: float, covariance_type: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M-step statistics: component sizes, means and covariances (``reg_covar`` added).

    A component with (almost) no responsibility gets size ``10 * eps``, a mean near 0
    and covariance ``reg_covar`` on the diagonal, never NaN.

    Args:
        X: data ``[n, d]``.
        resp: responsibilities ``[n, M]`` (rows sum to 1, or one-hot rows).
        reg_covar: added to the diagonal of every covariance.
        covariance_type: ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.

    Returns:
        ``(nk [M], means [M, d], covariances)``.

    Examples:
        >>> X = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 4.0], [12.0, 4.0]], dtype=torch.float64)
        >>> resp = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
        >>> nk, means, cov = estimate_gaussian_parameters(X, resp, 0.0, "diag")
        >>> means.tolist(), cov.tolist()
        ([[1.0, 0.0], [11.0, 4.0]], [[1.0, 0.0], [1.0, 0.0]])
    """
    n, d = X.shape
    n_components = resp.shape[1]
    nk = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps
    means = (resp.T @ X) / nk[:, None]
    if covariance_type == "full":
        # sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T as Z_k^T Z_k with Z_k = sqrt(r_k) (X - mu_k):
        # exact (no E[xx^T] - mu mu^T cancellation) and positive semi-definite by construction
        root = resp.sqrt().T.unsqueeze(-1)  # [M, n, 1]
        cov = X.new_zeros((n_components, d, d))
        for rows in _row_chunks(X, n_components * d):
            Z = X[rows].unsqueeze(0) - means.unsqueeze(1)
            Z.mul_(root[:, rows])
            cov.baddbmm_(Z.mT, Z)
        cov.div_(nk[:, None, None])
        cov = 0.5 * (cov + cov.mT)
        cov.diagonal(dim1=-2, dim2=-1).add_(reg_covar)
        return nk, means, cov
    if covariance_type == "tied":
        cov = X.T @ X - (nk[:, None] * means).T @ means
        cov = 0.5 * (cov + cov.T) / nk.sum()
        cov.diagonal().add_(reg_covar)
        return nk, means, cov
    # diag / spherical: E[x^2] - mu^2, clamped at 0 (rounding can make it slightly negative)
    var = ((resp.T @ (X * X)) / nk[:, None] - means * means).clamp_min_(0.0) + reg_covar
    if covariance_type == "diag":
        return nk, means, var
    return nk, means, var.mean(1)


def _cholesky_failure(reg_covar: Optional[float], components: str) -> None:
    hint = "increase reg_covar (e.g. 1e-4), use fewer components, or scale the data"
    got = f"reg_covar={reg_covar!r}, which leaves {components} not positive definite"
    fail("reg_covar", f"a value large enough for positive-definite covariances ({hint})", got,
         ValidationError, raw=True)


def precisions_cholesky_from_covariances(
    covariances: torch.Tensor, covariance_type: str, reg_covar: Optional[float] = None
) -> torch.Tensor:
    """Upper-triangular ``P`` with ``P @ P.T`` the inverse covariance (diag/spherical: ``1/sqrt``).

    Raises:
        ValidationError: a covariance is not positive definite; the message names
            ``reg_covar`` and suggests a larger value or fewer components.

    Examples:
        >>> cov = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> precisions_cholesky_from_covariances(cov, "tied").tolist()
        [[0.5, 0.0], [0.0, 1.0]]
    """
    if covariance_type in ("full", "tied"):
        chol, info = torch.linalg.cholesky_ex(covariances)
        bad = info > 0
        if bool(bad.any()):
            where = "the tied covariance" if covariance_type == "tied" else (
                "component(s) " + str(torch.nonzero(bad).flatten().tolist()))
            _cholesky_failure(reg_covar, where)
        eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
        return torch.linalg.solve_triangular(chol, eye, upper=False).mT.contiguous()
    bad = ~(covariances > 0)
    if bool(bad.any()):
        rows = torch.nonzero(bad.reshape(bad.shape[0], -1).any(1)).flatten().tolist()
        _cholesky_failure(reg_covar, f"component(s) {rows}")
    return covariances.rsqrt()


def precisions_cholesky_from_precisions(precisions: torch.Tensor, covariance_type: str) -> torch.Tensor:
    """Upper-triangular ``U`` with ``U @ U.T == precisions`` (reversed-order Cholesky).

    Examples:
        >>> prec = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> U = precisions_cholesky_from_precisions(prec, "tied")
        >>> bool(torch.allclose(U @ U.T, prec)), float(U[1, 0])
        (True, 0.0)
    """
    if covariance_type in ("full", "tied"):
        flipped = torch.linalg.cholesky(precisions.flip(-1, -2))
        return flipped.flip(-1, -2).contiguous()
    return precisions.sqrt()


def precisions_from_cholesky(precisions_cholesky: torch.Tensor, covariance_type: str) -> torch.Tensor:
    """Precisions ``P @ P.T`` (diag/spherical: ``P ** 2``)."""
    if covariance_type in ("full", "tied"):
        return precisions_cholesky @ precisions_cholesky.mT
    return precisions_cholesky * precisions_cholesky


def covariances_from_precisions_cholesky(precisions_cholesky: torch.Tensor, covariance_type: str) -> torch.Tensor:
    """Covariances ``(P @ P.T)^-1 = P^-T P^-1`` from the Cholesky factor of the precisions."""
    if covariance_type in ("full", "tied"):
        eye = torch.eye(precisions_cholesky.shape[-1], dtype=precisions_cholesky.dtype,
                        device=precisions_cholesky.device).expand_as(precisions_cholesky)
        inverse = torch.linalg.solve_triangular(precisions_cholesky, eye, upper=True)
        return inverse @ inverse.mT
    return 1.0 / (precisions_cholesky * precisions_cholesky)


# ----------------------------------------------------------------------------- E-step


def log_det_cholesky(precisions_cholesky: torch.Tensor, covariance_type: str, n_features: int) -> torch.Tensor:
    """``log det P`` per component (``[M]``; tied: a scalar) = half the log det of the precision."""
    if covariance_type in ("full", "tied"):
        return precisions_cholesky.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    if covariance_type == "diag":
        return precisions_cholesky.log().sum(1)
    return n_features * precisions_cholesky.log()


def _squared_norm(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(Y, dim=-1).square_()


def estimate_log_gaussian_prob(
    X: torch.Tensor, means: torch.Tensor, precisions_cholesky: torch.Tensor, covariance_type: str
) -> torch.Tensor:
    """``log N(x_i | mu_k, Sigma_k)`` for every sample and component: ``[n, M]``.

    Full covariances use one matrix product ``X @ [P_1 ... P_M]`` for all components.

    Examples:
        >>> X = torch.zeros(1, 2, dtype=torch.float64)
        >>> means = torch.zeros(1, 2, dtype=torch.float64)
        >>> chol = torch.eye(2, dtype=torch.float64)[None]
        >>> round(float(estimate_log_gaussian_prob(X, means, chol, "full")), 6)  # -log(2 pi)
        -1.837877
    """
    n, d = X.shape
    n_components = means.shape[0]
    log_det = log_det_cholesky(precisions_cholesky, covariance_type, d)
    if covariance_type in ("full", "tied"):
        if covariance_type == "full":
            offsets = torch.einsum("kd,kde->ke", means, precisions_cholesky)  # mu_k @ P_k
            stacked = precisions_cholesky.permute(1, 0, 2).reshape(d, n_components * d)  # [P_1 | ... | P_M]
        else:
            offsets, stacked = means @ precisions_cholesky, precisions_cholesky
        maha = X.new_empty((n, n_components))
        for rows in _row_chunks(X, n_components * d):
            Y = X[rows] @ stacked
            Y = Y.view(-1, n_components, d) - offsets if covariance_type == "full" else Y[:, None, :] - offsets
            maha[rows] = _squared_norm(Y)
    elif covariance_type == "diag":
        prec = precisions_cholesky * precisions_cholesky
        maha = ((means * means * prec).sum(1) - 2.0 * (X @ (means * prec).T) + (X * X) @ prec.T)
        maha.clamp_min_(0.0)
    else:
        prec = precisions_cholesky * precisions_cholesky
        cross = (means * means).sum(1) - 2.0 * (X @ means.T) + (X * X).sum(1, keepdim=True)
        maha = cross.clamp_min_(0.0) * prec
    return -0.5 * (d * math.log(2 * math.pi) + maha) + log_det


def estimate_log_prob_resp(
    X: torch.Tensor, weights: torch.Tensor, means: torch.Tensor,
    precisions_cholesky: torch.Tensor, covariance_type: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log p(x_i) [n], log responsibilities [n, M])`` with a log-sum-exp over components.

    Examples:
        >>> X = torch.tensor([[0.0], [3.0]], dtype=torch.float64)
        >>> means = torch.tensor([[0.0], [3.0]], dtype=torch.float64)
        >>> chol = torch.ones(2, dtype=torch.float64)
        >>> _, log_resp = estimate_log_prob_resp(X, torch.tensor([0.5, 0.5], dtype=torch.float64),
        ...                                      means, chol, "spherical")
        >>> log_resp.exp().round(decimals=3).tolist()
        [[0.989, 0.011], [0.011, 0.989]]
    """
    weighted = estimate_log_gaussian_prob(X, means, precisions_cholesky, covariance_type) + weights.log()
    log_prob_norm = torch.logsumexp(weighted, dim=1)
    log_resp = weighted - log_prob_norm[:, None]
    far = _numerics.far_rows(weighted)  # overflowed or digit-less distances: the scaled pairwise formula
    if bool(far.any()):
        rows = far.nonzero().flatten()
        norm, resp = _numerics.far_log_resp(X[rows], weights, means, precisions_cholesky, covariance_type)
        log_prob_norm, log_resp = log_prob_norm.index_copy(0, rows, norm), log_resp.index_copy(0, rows, resp)
    return log_prob_norm, log_resp


def e_step(
    X: torch.Tensor, weights: torch.Tensor, means: torch.Tensor,
    precisions_cholesky: torch.Tensor, covariance_type: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean log-likelihood (0-d tensor), log responsibilities [n, M])``."""
    log_prob_norm, log_resp = estimate_log_prob_resp(X, weights, means, precisions_cholesky, covariance_type)
    return log_prob_norm.mean(), log_resp


# ----------------------------------------------------------------------------- initialisation


def _rand(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on ``like``'s device."""
    values = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
    return values.to(device=like.device, dtype=like.dtype)


def _squared_distances(X: torch.Tensor, centers: torch.Tensor, x_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``||x_i - c_j||^2`` as ``[n, k]`` (clamped at 0)."""
    if x_sq is None:
        x_sq = (X * X).sum(1)
    d2 = x_sq[:, None] - 2.0 * (X @ centers.T) + (centers * centers).sum(1)[None, :]
    return d2.clamp_min_(0.0)


def kmeans_plusplus(
    X: torch.Tensor, n_clusters: int, generator: torch.Generator, n_local_trials: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-means++ seeding (as scikit-learn's ``kmeans_plusplus``).

    The first center is a uniform draw; each next one is the best (lowest potential) of
    ``2 + log(k)`` candidates drawn with probability proportional to the squared distance
    to the closest chosen center.

    Returns:
        ``(centers [k, d], indices [k])``.

    Examples:
        >>> X = torch.tensor([[0.0], [0.1], [10.0], [10.1]], dtype=torch.float64)
        >>> centers, idx = kmeans_plusplus(X, 2, torch.Generator().manual_seed(0))
        >>> sorted(round(c) for c in centers.flatten().tolist())
        [0, 10]
    """
    n = X.shape[0]
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(n_clusters))
    x_sq = (X * X).sum(1)
    first = min(int(_rand((1,), generator, x_sq)[0] * n), n - 1)
    indices = [first]
    closest = _squared_distances(X, X[first:first + 1], x_sq)[:, 0]
    for _ in range(1, n_clusters):
        cumulative = closest.cumsum(0)
        targets = _rand((n_local_trials,), generator, closest) * cumulative[-1]
        candidates = torch.searchsorted(cumulative, targets).clamp_(max=n - 1)
        to_candidates = torch.minimum(closest[None, :], _squared_distances(X, X[candidates], x_sq).T)
        best = int(to_candidates.sum(1).argmin())
        indices.append(int(candidates[best]))
        closest = to_candidates[best]
    index = torch.tensor(indices, device=X.device)
    return X[index], index


def kmeans(
    X: torch.Tensor, n_clusters: int, generator: torch.Generator, *, max_iter: int = 300, tol: float = 1e-4
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from a k-means++ seeding; returns ``(labels [n], centers [k, d])``.

    Stops when the labels no longer change or the squared center shift falls below
    ``tol`` times the mean feature variance (scikit-learn's rule). An empty cluster is
    moved to the point farthest from its center.

    Examples:
        >>> X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [9.0, 9.0], [9.0, 10.0]], dtype=torch.float64)
        >>> labels, _ = kmeans(X, 2, torch.Generator().manual_seed(0))
        >>> bool(labels[0] == labels[1]) and bool(labels[2] == labels[3]) and bool(labels[0] != labels[2])
        True
    """
    n = X.shape[0]
    centers, _ = kmeans_plusplus(X, n_clusters, generator)
    x_sq = (X * X).sum(1)
    threshold = tol * float(X.var(0, unbiased=False).mean()) if n > 1 else 0.0
    labels = None
    for _ in range(max_iter):
        d2 = _squared_distances(X, centers, x_sq)
        new_labels = d2.argmin(1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=n_clusters).to(X.dtype)
        sums = X.new_zeros((n_clusters, X.shape[1])).index_add_(0, labels, X)
        empty = counts == 0
        new_centers = sums / counts.clamp_min(1.0)[:, None]
        if bool(empty.any()):
            own = d2.gather(1, labels[:, None])[:, 0]
            far = own.argsort(descending=True)[: int(empty.sum())]
            new_centers[empty] = X[far]
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if shift <= threshold:
            break
    labels = _squared_distances(X, centers, x_sq).argmin(1)
    return labels, centers


def initial_resp(X: torch.Tensor, n_components: int, init_params: str, generator: torch.Generator) -> torch.Tensor:
    """Initial responsibilities ``[n, M]`` for ``init_params`` (scikit-learn's four methods).

    ``"kmeans"``: one-hot k-means labels; ``"k-means++"``: one-hot on the k-means++
    seeds only; ``"random"``: uniform rows normalised to 1; ``"random_from_data"``:
    one-hot on ``M`` distinct random samples.

    Examples:
        >>> X = torch.arange(10, dtype=torch.float64)[:, None]
        >>> resp = initial_resp(X, 3, "random_from_data", torch.Generator().manual_seed(0))
        >>> resp.shape, float(resp.sum())
        (torch.Size([10, 3]), 3.0)
    """
    n = X.shape[0]
    resp = X.new_zeros((n, n_components))
    columns = torch.arange(n_components, device=X.device)
    if init_params == "kmeans":
        labels, _ = kmeans(X, n_components, generator)
        resp[torch.arange(n, device=X.device), labels] = 1.0
    elif init_params == "k-means++":
        _, indices = kmeans_plusplus(X, n_components, generator)
        resp[indices, columns] = 1.0
    elif init_params == "random":
        resp = _rand((n, n_components), generator, X)
        resp = resp / resp.sum(1, keepdim=True)
    elif init_params == "random_from_data":
        indices = _rand((n,), generator, X).argsort()[:n_components]
        resp[indices, columns] = 1.0
    else:  # pragma: no cover - validated by the caller
        fail("init_params", "one of " + ", ".join(map(repr, INIT_PARAMS)), init_params)
    return resp
