"""Gaussian mixture models with scikit-learn's contract, in torch (CPU or CUDA).

:class:`GaussianMixture` takes the parameter names, fitted attributes and methods of
``sklearn.mixture.GaussianMixture``, so the same settings give the same EM path (the
tests use scikit-learn as the oracle). The math lives in :mod:`cmda_data.core._em`; this
module validates inputs, draws the initialisation with an explicit
``torch.Generator`` and keeps the fitted state.

The whole EM runs in float64 on the device of ``X`` (float64 is exact enough for
scikit-learn parity and cheap next to the matrix products). Results are tensors on
``X``'s device.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch

from ..exceptions import ConvergenceWarning, NotFittedError, ShapeError
from . import _em
from ._validation import check_finite, check_int, check_option, check_positive_float, check_rank, fail

__all__ = ["GaussianMixture", "select_n_components"]
CRITERIA = ("bic", "aic")  #: the model-selection criteria of select_n_components (lower is better)
_DTYPE = torch.float64


def _as_matrix(X: Any, name: str = "X") -> Tuple[torch.Tensor, torch.dtype]:
    """``X`` as a finite float64 ``[n, d]`` tensor on its device, plus the dtype results take."""
    if isinstance(X, np.ndarray):
        if X.dtype.kind not in "biuf":
            fail(name, "a real-valued array (bool, integer or float)", X)
        X = torch.from_numpy(np.ascontiguousarray(X))
    elif not isinstance(X, torch.Tensor):
        fail(name, "a torch.Tensor or numpy array of shape [n_samples, n_features]", X)
    if X.is_complex():
        fail(name, "a real-valued tensor", X)
    check_rank(name, X, 2)
    if X.shape[0] < 1 or X.shape[1] < 1:
        fail(name, "at least one sample and one feature", X, ShapeError)
    check_finite(name, X)
    out_dtype = X.dtype if X.is_floating_point() else _DTYPE
    return X.detach().to(_DTYPE), out_dtype


def _as_init(name: str, value: Any, device: torch.device) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        fail(name, "an array of real numbers", value)
    if tensor.is_complex() or tensor.dtype == torch.bool or not (tensor.is_floating_point() or tensor.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        fail(name, "an array of real numbers", value)
    check_finite(name, tensor)
    return tensor.detach().to(device=device, dtype=_DTYPE)


def _new_generator(random_state: Any) -> torch.Generator:
    """The generator of one fit: the given one, one seeded from an int, or an OS-random seed."""
    if isinstance(random_state, torch.Generator):
        return random_state
    seed = int.from_bytes(os.urandom(8), "little") >> 1 if random_state is None else int(random_state)
    return torch.Generator().manual_seed(seed)


class GaussianMixture:
    """A Gaussian mixture fitted by EM, with ``sklearn.mixture.GaussianMixture``'s contract.

    Args:
        n_components: number of mixture components ``M``.
        covariance_type: ``"full"`` (one matrix per component), ``"tied"`` (one shared
            matrix), ``"diag"`` (one diagonal per component) or ``"spherical"`` (one
            variance per component).
        tol: EM stops when the mean log-likelihood changes by less than ``tol``.
        reg_covar: non-negative value added to the diagonal of every covariance.
        max_iter: EM iterations per initialisation (0: keep the initial parameters).
        n_init: initialisations; the one with the best lower bound is kept.
        init_params: ``"kmeans"``, ``"k-means++"``, ``"random"`` or ``"random_from_data"``.
        weights_init: initial weights ``[M]`` (non-negative, sum 1) or None.
        means_init: initial means ``[M, d]`` or None.
        precisions_init: initial precisions (inverse covariances) in the shape of
            ``covariance_type``: full ``[M, d, d]``, tied ``[d, d]``, diag ``[M, d]``,
            spherical ``[M]``; or None.
        random_state: an int seed (each ``fit``/``sample`` call starts from it), a
            ``torch.Generator`` (advanced by every call) or None (a fresh seed from
            ``os.urandom``; the global torch RNG is never used).
        generator: a ``torch.Generator``, the torch spelling of ``random_state=generator``
            (give one of the two).
        warm_start: start the next ``fit`` from the current solution (one initialisation).
        verbose: 0 silent, 1 prints initialisations, 2 also the change per step.
        verbose_interval: iterations between two progress lines.

    Attributes:
        weights_ (Tensor): ``[M]`` float64.
        means_ (Tensor): ``[M, d]`` float64.
        covariances_ (Tensor): covariances in the shape of ``covariance_type``.
        precisions_ (Tensor): their inverses.
        precisions_cholesky_ (Tensor): upper-triangular ``P`` with ``P @ P.T = precision``.
        converged_ (bool): whether the best initialisation converged.
        n_iter_ (int): EM steps of the best initialisation.
        lower_bound_ (float): mean log-likelihood (before the last M-step) of the best fit.
        lower_bounds_ (list[float]): the lower bound after each step of the best fit.
        n_features_in_ (int): features seen by ``fit``.

    Raises:
        ValidationError: an option is out of range (message: ``"<arg>: expected ..., got ..."``).

    Examples:
        >>> X = torch.tensor([[1.0, 2.0], [1.0, 4.0], [1.0, 0.0], [10.0, 2.0], [10.0, 4.0], [10.0, 0.0]])
        >>> gm = GaussianMixture(2, random_state=0).fit(X)
        >>> order = gm.means_[:, 0].argsort()
        >>> gm.means_[order].tolist()
        [[1.0, 2.0], [10.0, 2.0]]
        >>> gm.predict(torch.tensor([[0.0, 0.0], [12.0, 3.0]])).tolist() == order.tolist()
        True
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Optional[int | torch.Generator] = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.generator = generator
        self._check_config()

    def __repr__(self) -> str:
        return (f"GaussianMixture(n_components={self.n_components}, "
                f"covariance_type={self.covariance_type!r})")

    # ------------------------------------------------------------------ validation

    def _check_config(self) -> None:
        check_int("n_components", self.n_components, minimum=1)
        check_option("covariance_type", self.covariance_type, _em.COVARIANCE_TYPES)
        check_positive_float("tol", self.tol, allow_zero=True)
        check_positive_float("reg_covar", self.reg_covar, allow_zero=True)
        check_int("max_iter", self.max_iter, minimum=0)
        check_int("n_init", self.n_init, minimum=1)
        check_option("init_params", self.init_params, _em.INIT_PARAMS)
        rs = self.random_state
        if not (rs is None or isinstance(rs, torch.Generator) or (
                isinstance(rs, (int, np.integer)) and not isinstance(rs, bool) and 0 <= rs < 2 ** 63)):
            fail("random_state", "None, an integer in [0, 2**63) or a torch.Generator", rs)
        if self.generator is not None:
            if not isinstance(self.generator, torch.Generator):
                fail("generator", "None or a torch.Generator", self.generator)
            if rs is not None:
                fail("generator", "a generator or a random_state, not both",
                     f"generator and random_state={rs!r}", raw=True)
        if not isinstance(self.warm_start, (bool, np.bool_)):
            fail("warm_start", "a bool", self.warm_start)
        if not isinstance(self.verbose, bool):
            check_int("verbose", self.verbose, minimum=0)
        check_int("verbose_interval", self.verbose_interval, minimum=1)

    def _generator(self) -> torch.Generator:
        """The generator of one ``fit`` / ``sample`` call (from ``generator`` or ``random_state``)."""
        return self.generator if self.generator is not None else _new_generator(self.random_state)

    def _check_inits(self, n_features: int, device: torch.device):
        """The user's initial arrays as float64 tensors (or None), shapes and values checked."""
        M, d, kind = int(self.n_components), n_features, self.covariance_type
        weights = means = precisions = None
        if self.weights_init is not None:
            weights = _as_init("weights_init", self.weights_init, device)
            if tuple(weights.shape) != (M,):
                fail("weights_init", f"shape ({M},) = (n_components,)", self.weights_init, ShapeError)
            total = float(weights.sum())
            if bool((weights < 0).any()) or bool((weights > 1).any()) or abs(total - 1.0) > 1e-6:
                fail("weights_init", "weights in [0, 1] that sum to 1",
                     f"min {float(weights.min()):.6g}, max {float(weights.max()):.6g}, sum {total:.6g}", raw=True)
        if self.means_init is not None:
            means = _as_init("means_init", self.means_init, device)
            if tuple(means.shape) != (M, d):
                fail("means_init", f"shape ({M}, {d}) = (n_components, n_features)", self.means_init, ShapeError)
        if self.precisions_init is not None:
            precisions = _as_init("precisions_init", self.precisions_init, device)
            shape = {"full": (M, d, d), "tied": (d, d), "diag": (M, d), "spherical": (M,)}[kind]
            if tuple(precisions.shape) != shape:
                names = {"full": "(n_components, n_features, n_features)", "tied": "(n_features, n_features)",
                         "diag": "(n_components, n_features)", "spherical": "(n_components,)"}[kind]
                fail("precisions_init", f"shape {shape} = {names} for covariance_type={kind!r}",
                     self.precisions_init, ShapeError)
            if kind in ("full", "tied"):
                symmetric = torch.allclose(precisions, precisions.mT, rtol=1e-5, atol=1e-8)
                if not symmetric or bool((torch.linalg.cholesky_ex(precisions).info > 0).any()):
                    fail("precisions_init", "symmetric positive-definite matrices",
                         "a matrix that is " + ("not symmetric" if not symmetric else "not positive definite"),
                         raw=True)
            elif bool((precisions <= 0).any()):
                fail("precisions_init", "positive values", f"minimum {float(precisions.min()):.6g}", raw=True)
        return weights, means, precisions

    def _check_fitted(self) -> None:
        if not hasattr(self, "precisions_cholesky_"):
            fail("GaussianMixture", "a fitted model (call fit(X) first)", "an instance that was not fitted",
                 NotFittedError, raw=True)

    def _check_X(self, X: Any) -> Tuple[torch.Tensor, torch.dtype]:
        self._check_fitted()
        data, out_dtype = _as_matrix(X)
        if data.shape[1] != self.n_features_in_:
            fail("X", f"{self.n_features_in_} features (as seen in fit)", f"{data.shape[1]} features",
                 ShapeError, raw=True)
        return data, out_dtype

    # ------------------------------------------------------------------ fitting

    def fit(self, X: Any, y: Any = None) -> "GaussianMixture":
        """Fit the mixture with EM (``n_init`` starts, the best lower bound wins); returns self.

        Args:
            X: ``[n_samples, n_features]`` tensor (any device) or numpy array, finite,
                with ``n_samples >= n_components``.
            y: ignored (scikit-learn's signature).

        Warns:
            ConvergenceWarning: the best start did not converge within ``max_iter``; or k-means
                (``init_params="kmeans"``) found fewer distinct clusters than ``n_components``
                (duplicate points), with scikit-learn's message.
        """
        self.fit_predict(X, y)
        return self

    def fit_predict(self, X: Any, y: Any = None) -> torch.Tensor:
        """Fit like :meth:`fit` and return the component of each sample (``[n]`` long)."""
        self._check_config()
        data, _ = _as_matrix(X)
        n, d = data.shape
        M, kind, reg = int(self.n_components), self.covariance_type, float(self.reg_covar)
        if n < M:
            fail("X", f"n_samples >= n_components = {M}", f"{n} samples", ShapeError, raw=True)
        do_init = not (self.warm_start and hasattr(self, "converged_"))
        if not do_init and d != self.n_features_in_:
            fail("X", f"{self.n_features_in_} features for warm_start (as seen in fit)", f"{d} features",
                 ShapeError, raw=True)
        inits = self._check_inits(d, data.device)
        generator = self._generator()
        # EM is translation invariant: run it on centered data for accuracy, shift the means back
        shift = data.mean(0)
        data = data - shift
        n_init = int(self.n_init) if do_init else 1
        max_iter, tol = int(self.max_iter), float(self.tol)
        max_lower_bound, best, best_iter, best_bounds, best_converged = -math.inf, None, 0, [], False
        for init in range(n_init):
            self._verbose_begin(init)
            if do_init:
                params = self._initial_params(data, inits, shift, generator)
                lower_bound = -math.inf
            else:
                params = (self.weights_.to(data.device), self.means_.to(data.device) - shift,
                          self.covariances_.to(data.device), self.precisions_cholesky_.to(data.device))
                lower_bound = self.lower_bound_
            if max_iter == 0:
                best, best_iter = params, 0
                continue
            bounds, converged = [], False
            for n_iter in range(1, max_iter + 1):
                previous = lower_bound
                mean_log_prob, log_resp = _em.e_step(data, params[0], params[1], params[3], kind)
                nk, means, covariances = _em.estimate_gaussian_parameters(data, log_resp.exp_(), reg, kind)
                chol = _em.precisions_cholesky_from_covariances(covariances, kind, reg)
                params = (nk / nk.sum(), means, covariances, chol)
                lower_bound = float(mean_log_prob)
                bounds.append(lower_bound)
                change = lower_bound - previous
                self._verbose_iter(n_iter, change)
                if abs(change) < tol:
                    converged = True
                    break
            self._verbose_end(lower_bound, converged)
            if lower_bound > max_lower_bound or max_lower_bound == -math.inf:
                max_lower_bound, best, best_iter, best_bounds = lower_bound, params, n_iter, bounds
                best_converged = converged
        if not best_converged and max_iter > 0:
            warnings.warn("Best performing initialization did not converge. Try different init parameters, "
                          "or increase max_iter, tol, or check for degenerate data.", ConvergenceWarning,
                          stacklevel=2)
        weights, means, covariances, chol = best
        if not all(bool(torch.isfinite(t).all()) for t in best):  # e.g. a variance beyond float64 (|x| ~ 1e200)
            fail("X", "data whose mixture parameters are finite in float64 (spread below about 1e150: scale it)",
                 f"values from {float(data.min() + shift.min()):.4g} to {float(data.max() + shift.max()):.4g}",
                 raw=True)
        self.weights_, self.means_, self.covariances_ = weights, means + shift, covariances
        self.precisions_cholesky_ = chol
        self.precisions_ = _em.precisions_from_cholesky(chol, kind)
        self.n_iter_, self.lower_bound_, self.lower_bounds_ = best_iter, max_lower_bound, best_bounds
        self.converged_ = best_converged
        self.n_features_in_ = d
        fit_score, log_resp = _em.e_step(data, weights, means, chol, kind)
        self._fit_score = float(fit_score)  # score(X) of the training data: bic/aic with no 2nd E-step
        return log_resp.argmax(1)

    def _initial_params(self, data, inits, shift, generator):
        """(weights, means, covariances, precisions_cholesky) of one start, in centered coordinates."""
        kind, reg = self.covariance_type, float(self.reg_covar)
        weights_init, means_init, precisions_init = inits
        weights = means = covariances = None
        if weights_init is None or means_init is None or precisions_init is None:
            resp = _em.initial_resp(data, int(self.n_components), self.init_params, generator)
            found = int((resp.sum(0) > 0).sum()) if self.init_params == "kmeans" else int(self.n_components)
            if found < int(self.n_components):  # scikit-learn's KMeans warning, word for word
                warnings.warn(f"Number of distinct clusters ({found}) found smaller than n_clusters "
                              f"({int(self.n_components)}). Possibly due to duplicate points in X.",
                              ConvergenceWarning, stacklevel=4)
            nk, means, covariances = _em.estimate_gaussian_parameters(data, resp, reg, kind)
            weights = nk / data.shape[0]
        if weights_init is not None:
            weights = weights_init
        if means_init is not None:
            means = means_init - shift
        if precisions_init is None:
            chol = _em.precisions_cholesky_from_covariances(covariances, kind, reg)
        else:
            chol = _em.precisions_cholesky_from_precisions(precisions_init, kind)
            covariances = _em.covariances_from_precisions_cholesky(chol, kind)
        return weights, means, covariances, chol

    # ------------------------------------------------------------------ inference

    def _params_on(self, device: torch.device):
        return (self.weights_.to(device), self.means_.to(device), self.precisions_cholesky_.to(device))

    def _log_prob_resp(self, X: Any):
        data, out_dtype = self._check_X(X)
        weights, means, chol = self._params_on(data.device)
        shift = means.mean(0)  # center for accuracy; log densities are translation invariant
        log_prob_norm, log_resp = _em.estimate_log_prob_resp(data - shift, weights, means - shift, chol,
                                                             self.covariance_type)
        return log_prob_norm, log_resp, out_dtype

    def predict(self, X: Any) -> torch.Tensor:
        """Most probable component of each sample: ``[n]`` long tensor on ``X``'s device."""
        _, log_resp, _ = self._log_prob_resp(X)
        return log_resp.argmax(1)

    def predict_proba(self, X: Any) -> torch.Tensor:
        """Responsibilities ``[n, M]`` (rows sum to 1) in ``X``'s float dtype (float64 for integers)."""
        _, log_resp, out_dtype = self._log_prob_resp(X)
        return log_resp.exp().to(out_dtype)

    def score_samples(self, X: Any) -> torch.Tensor:
        """Log-density ``log p(x_i)`` of each sample: ``[n]`` in ``X``'s float dtype."""
        log_prob_norm, _, out_dtype = self._log_prob_resp(X)
        return log_prob_norm.to(out_dtype)

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood of ``X`` under the model (a Python float)."""
        log_prob_norm, _, _ = self._log_prob_resp(X)
        return float(log_prob_norm.mean())

    def _n_parameters(self) -> int:
        """Free parameters: covariances + means + (M - 1) weights."""
        self._check_fitted()
        M, d = self.means_.shape
        cov = {"full": M * d * (d + 1) / 2.0, "diag": M * d, "tied": d * (d + 1) / 2.0,
               "spherical": M}[self.covariance_type]
        return int(cov + d * M + M - 1)

    def bic(self, X: Any) -> float:
        """Bayesian information criterion ``-2 n score(X) + p log n`` (lower is better)."""
        n = int(X.shape[0]) if hasattr(X, "shape") else len(X)
        return -2.0 * self.score(X) * n + self._n_parameters() * math.log(n)

    def aic(self, X: Any) -> float:
        """Akaike information criterion ``-2 n score(X) + 2 p`` (lower is better)."""
        n = int(X.shape[0]) if hasattr(X, "shape") else len(X)
        return -2.0 * self.score(X) * n + 2 * self._n_parameters()

    def sample(self, n_samples: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw ``(X [n, d] float64, labels [n] long)``, grouped by component like scikit-learn.

        Uses ``random_state`` (an int gives the same draw each call).

        Examples:
            >>> gm = GaussianMixture(2, random_state=0).fit(torch.tensor([[0.0], [0.2], [5.0], [5.2]]))
            >>> X, y = gm.sample(5)
            >>> tuple(X.shape), tuple(y.shape), y.dtype
            ((5, 1), (5,), torch.int64)
        """
        self._check_fitted()
        n_samples = check_int("n_samples", n_samples, minimum=1)
        generator = self._generator()
        gdev = generator.device
        device, (M, d) = self.means_.device, self.means_.shape
        picks = torch.multinomial(self.weights_.to(gdev), n_samples, replacement=True, generator=generator)
        counts = torch.bincount(picks, minlength=M).tolist()
        noise = torch.randn((n_samples, d), generator=generator, device=gdev, dtype=_DTYPE).to(device)
        labels = torch.repeat_interleave(torch.arange(M, device=device),
                                         torch.tensor(counts, device=device))
        chol, kind = self.precisions_cholesky_, self.covariance_type
        if kind in ("full", "tied"):
            chols = chol if kind == "full" else chol.expand(M, d, d)
            parts, start = [], 0
            for k, count in enumerate(counts):  # z @ P^-1 has covariance P^-T P^-1 = Sigma
                z = noise[start:start + count]
                parts.append(torch.linalg.solve_triangular(chols[k], z, upper=True, left=False))
                start += count
            X = torch.cat(parts) + self.means_[labels]
        else:
            scale = chol[:, None].expand(M, d) if kind == "spherical" else chol
            X = self.means_[labels] + noise / scale[labels]
        return X, labels

    # ------------------------------------------------------------------ verbose output

    def _verbose_begin(self, init: int) -> None:
        if self.verbose >= 1:
            print(f"Initialization {init}")

    def _verbose_iter(self, n_iter: int, change: float) -> None:
        if self.verbose >= 1 and n_iter % self.verbose_interval == 0:
            print(f"  Iteration {n_iter}" + (f"\t ll change {change:.5f}" if self.verbose >= 2 else ""))

    def _verbose_end(self, lower_bound: float, converged: bool) -> None:
        if self.verbose >= 1:
            state = "converged" if converged else "did not converge"
            print(f"Initialization {state}." + (f"\t lower bound {lower_bound:.5f}." if self.verbose >= 2 else ""))


def select_n_components(
    X: Any, candidates: Iterable[int] = range(1, 7), *, criterion: str = "bic", **gmm_kwargs: Any
) -> Tuple[int, Dict[int, float]]:
    """Fit one :class:`GaussianMixture` per candidate ``M``; return the best ``M`` and all scores.

    Args:
        X: ``[n_samples, n_features]`` tensor or numpy array.
        candidates: component counts to try (integers >= 1, at most ``n_samples``).
        criterion: ``"bic"`` or ``"aic"`` (lower is better; ties go to the smaller ``M``).
        **gmm_kwargs: any other :class:`GaussianMixture` argument (not ``n_components``).

    Returns:
        ``(best_m, {m: score})``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.cat([torch.randn(60, 2, generator=g), torch.randn(60, 2, generator=g) + 12])
        >>> best, scores = select_n_components(X, [1, 2, 3], random_state=0)
        >>> best, sorted(scores)
        (2, [1, 2, 3])
    """
    check_option("criterion", criterion, CRITERIA)
    if "n_components" in gmm_kwargs:
        fail("gmm_kwargs", "no 'n_components' (it comes from candidates)", gmm_kwargs["n_components"])
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Iterable):
        fail("candidates", "an iterable of integers >= 1", candidates)
    try:
        values = list(candidates)
    except TypeError:  # e.g. a 0-d tensor
        fail("candidates", "an iterable of integers >= 1", candidates)
    if not values:
        fail("candidates", "at least one component count", candidates)
    values = list(dict.fromkeys(check_int("candidates", m, minimum=1) for m in values))
    data, _ = _as_matrix(X)
    if max(values) > data.shape[0]:
        fail("candidates", f"component counts <= n_samples = {data.shape[0]}", f"{max(values)}", raw=True)
    scores = {m: score for m, _, score in fit_candidates(data, values, criterion, gmm_kwargs)}
    best = min(scores, key=lambda m: (scores[m], m))
    return best, scores


def fit_candidates(data: torch.Tensor, values: Iterable[int], criterion: str,
                   gmm_kwargs: Dict[str, Any]) -> Iterator[Tuple[int, "GaussianMixture", float]]:
    """``(m, fitted model, bic/aic)`` per candidate (private); the score reuses the fit's last E-step."""
    for m, n in ((m, data.shape[0]) for m in values):
        model = GaussianMixture(m, **gmm_kwargs).fit(data)
        yield m, model, -2.0 * model._fit_score * n + model._n_parameters() * (math.log(n) if criterion == "bic" else 2)
