"""Fitting and persisting the bank's Gaussian mixture (private).

``fit_mixture`` optionally projects the embeddings on their first principal components,
chooses M by BIC when it is not given, fits :class:`~cmda_data.GaussianMixture` and returns
the responsibilities. ``gmm_state`` / ``gmm_from_state`` turn a fitted mixture into JSON
settings + tensors and back (no pickle).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch

from ..core._validation import check_int, check_option, fail
from ..core.mixture import CRITERIA, GaussianMixture, fit_candidates
from ..exceptions import CMDAWarning

__all__ = ["FittedMixture", "fit_mixture", "fit_model", "gmm_from_state", "gmm_state", "pca_fit", "pca_project",
           "responsibility_chunks", "rows_per_component", "warn_dca_inert"]

_CONFIG_KEYS = ("n_components", "covariance_type", "tol", "reg_covar", "max_iter", "n_init", "init_params")
_TENSOR_KEYS = ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_")
_FACT_KEYS = ("converged_", "n_iter_", "lower_bound_", "n_features_in_")
#: rows the PCA, the choice of M and the EM fit see at most (a random subsample beyond it)
MAX_FIT_ROWS = 20_000
#: rows per chunk of the responsibilities pass (float64 copies of one chunk at a time: 32 MB at d = 512)
RESP_CHUNK_ROWS = 1 << 13


@dataclass
class FittedMixture:
    gmm: Any
    responsibilities: Optional[torch.Tensor]
    pca: Optional[Tuple[torch.Tensor, torch.Tensor]]
    metadata: Dict[str, Any] = field(default_factory=dict)


def pca_fit(x: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean [d], components [dim, d])``: the top principal axes of ``x`` (signs fixed).

    Examples:
        >>> x = torch.tensor([[0.0, 0.0], [2.0, 0.1], [4.0, -0.1]])
        >>> mean, comp = pca_fit(x, 1)
        >>> mean.tolist(), [round(v, 3) for v in comp[0].tolist()]
        ([2.0, 0.0], [1.0, 0.0])
    """
    data = x.double()
    mean = data.mean(0)
    centered = data - mean
    cov = centered.T @ centered / max(1, data.shape[0] - 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    components = vectors.flip(1)[:, :dim].T.contiguous()
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    return mean.float(), components.float()


def pca_project(x: torch.Tensor, pca: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Project ``x`` [n, d] on the stored principal axes: ``[n, r]``."""
    mean, components = pca
    return (x - mean.to(x.device, x.dtype)) @ components.to(x.device, x.dtype).T


def fit_subsample(n: int, max_fit_rows: Optional[int], random_state: Any) -> Optional[torch.Tensor]:
    """Sorted indices of ``max_fit_rows`` of ``n`` rows drawn uniformly (None: fit on all rows).

    Drawn from ``random_state``: an int seeds a fresh generator (the same rows each time), a
    ``torch.Generator`` is advanced, None draws an OS-random seed.

    Examples:
        >>> fit_subsample(10, 20, 0) is None, fit_subsample(10, 4, 0).tolist() == fit_subsample(10, 4, 0).tolist()
        (True, True)
    """
    if max_fit_rows is None or n <= max_fit_rows:
        return None
    if isinstance(random_state, torch.Generator):
        generator = random_state
    else:
        generator = torch.Generator()
        if random_state is None:
            generator.seed()
        else:
            generator.manual_seed(int(random_state))
    order = torch.randperm(n, generator=generator, device=generator.device)[:max_fit_rows]
    return order.cpu().sort().values


def responsibility_chunks(gmm: Any, read: Callable[[int, int], torch.Tensor], n: int, *, progress: bool = False
                          ) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(start, gmm.predict_proba(read(start, stop)).float())`` over ``n`` rows, ``RESP_CHUNK_ROWS`` at a time.

    ``read(start, stop)``: rows ``start:stop`` as the GMM sees them (projected when it was
    fitted on principal components). One chunk at a time, each converted to float64 on its
    own, so the peak memory does not grow with N (the disk-backed build reads each chunk
    from its file).
    """
    starts = range(0, n, RESP_CHUNK_ROWS)
    for start in _bar(starts, progress, "responsibilities", len(starts), "chunk"):
        yield start, gmm.predict_proba(read(start, min(n, start + RESP_CHUNK_ROWS))).float()


def responsibilities(gmm: Any, x: torch.Tensor, *, progress: bool = False) -> torch.Tensor:
    """``gmm.predict_proba(x)`` as float32 ``[N, M]``, by :func:`responsibility_chunks`."""
    out = torch.empty((x.shape[0], int(gmm.n_components)), dtype=torch.float32, device=x.device)
    for start, chunk in responsibility_chunks(gmm, lambda a, b: x[a:b], x.shape[0], progress=progress):
        out[start:start + len(chunk)] = chunk
    return out


def _bar(iterable: Any, enabled: bool, desc: str, total: int, unit: str) -> Any:
    """A tqdm bar over ``iterable`` that shows only when the step takes over two seconds (tqdm optional)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit=unit, delay=2.0)


def warn_dca_inert(field: Optional[str], criterion: str, scores: Dict[int, float]) -> str:
    """Warn (:class:`~cmda_data.CMDAWarning`) that the choice of M gave 1; return the message.

    With M = 1 every responsibility is 1, so the intra-modal weights of Eq. 11 are the constant
    2 and DCA changes nothing: only the inter-modal weights (Eq. 10) act.
    """
    table = ", ".join(f"M={m}: {score:.1f}" for m, score in sorted(scores.items()))
    where = f"the {field!r} embeddings" if field else "the embeddings"
    message = (f"{criterion.upper()} chose M = 1 for the Gaussian mixture on {where} "
               f"({criterion.upper()} {table}; lower is better): one cluster, so the intra-modal (DCA) "
               "weights of Eq. 11 are all equal and do nothing; only the teacher (Eq. 10) weights act. "
               "Pass n_components=2 (the paper's choice) to force DCA, or reduce_dim=... if the latents "
               "have too many dimensions for a full covariance")
    warnings.warn(message, CMDAWarning, stacklevel=4)
    return message


def rows_per_component(covariance_type: str, d: int) -> float:
    """The fewest rows a component needs for a non-singular covariance estimate in ``d`` dims.

    A full ``d x d`` covariance from fewer than ``d + 1`` rows is singular: only ``reg_covar``
    keeps it invertible, the component's likelihood grows without bound as it shrinks onto its
    rows, and BIC / AIC then prefer ever more components. A diagonal or spherical variance needs
    two rows; a tied covariance pools every row, so no component is too small on its own.

    Examples:
        >>> rows_per_component("full", 16), rows_per_component("diag", 16), rows_per_component("tied", 16)
        (17, 2, 0)
    """
    return {"full": d + 1, "diag": 2, "spherical": 2}.get(covariance_type, 0)


def warn_degenerate(field: Optional[str], criterion: str, degenerate: Dict[int, float], need: float,
                    best: Optional[int]) -> None:
    """Warn (:class:`~cmda_data.CMDAWarning`) that the criterion's best M had components too small to fit.

    ``best``: the M chosen among the large-enough candidates, or None when there was none
    (then the criterion's own choice is kept, and the warning says so).
    """
    where = f"the {field!r} embeddings" if field else "the embeddings"
    sizes = ", ".join(f"M={m}: {rows:.1f}" for m, rows in sorted(degenerate.items()))
    head = (f"{criterion.upper()} on {where} is best for an M whose smallest component holds fewer rows than "
            f"its covariance needs ({need}; smallest component by M: {sizes}): such a component is a singular "
            "fit, not a cluster. ")
    if best is None:
        tail = (f"Every candidate is like that, so {criterion.upper()}'s own choice is kept: include 1 in "
                "candidates, or use more rows, reduce_dim=... or covariance_type='diag'")
    else:
        tail = (f"Chose M = {best} among the candidates whose components are all large enough (more rows, "
                "reduce_dim=..., or covariance_type='diag' allow more components)")
    warnings.warn(head + tail, CMDAWarning, stacklevel=5)


def fit_mixture(x: torch.Tensor, *, n_components: Optional[int], candidates: Iterable[int],
                reduce_dim: Optional[int], random_state: Any = 0, criterion: str = "bic",
                field: Optional[str] = None, max_fit_rows: Optional[int] = MAX_FIT_ROWS,
                progress: bool = False, **gmm_options: Any) -> FittedMixture:
    """Fit the GMM on ``x`` [N, d]; M by ``criterion`` over ``candidates`` when None.

    When the criterion picks M = 1 out of several candidates, a :class:`~cmda_data.CMDAWarning`
    names ``field`` and the scores, and ``metadata["dca_inert"]`` keeps its message.

    With more than ``max_fit_rows`` rows (None: no limit), the PCA, the choice of M and the EM
    fit see a uniform random subsample of ``max_fit_rows`` rows (drawn from ``random_state``);
    the responsibilities are computed for every row, in chunks. The model fitted while
    choosing M is the one kept (no second fit). ``progress`` shows tqdm bars for the steps
    that take more than a couple of seconds.
    """
    fitted = fit_model(lambda rows: x if rows is None else x[rows], tuple(x.shape), n_components=n_components,
                       candidates=candidates, reduce_dim=reduce_dim, random_state=random_state,
                       criterion=criterion, field=field, max_fit_rows=max_fit_rows, progress=progress,
                       **gmm_options)
    projected = x if fitted.pca is None else pca_project(x, fitted.pca)
    fitted.responsibilities = responsibilities(fitted.gmm, projected, progress=progress)
    return fitted


def fit_model(read_rows: Callable[[Optional[torch.Tensor]], torch.Tensor], shape: Tuple[int, int], *,
              n_components: Optional[int], candidates: Iterable[int], reduce_dim: Optional[int],
              random_state: Any = 0, criterion: str = "bic", field: Optional[str] = None,
              max_fit_rows: Optional[int] = MAX_FIT_ROWS, progress: bool = False,
              **gmm_options: Any) -> FittedMixture:
    """The PCA, choice of M and EM fit of :func:`fit_mixture`, without the responsibilities.

    ``read_rows(rows)`` returns the rows ``rows`` (sorted indices) of the ``shape`` = ``[N, d]``
    table, or all of it for None: the table itself need not be in memory (the disk-backed
    build reads them from its file). ``responsibilities`` of the result is None.
    """
    n, d = shape
    max_fit_rows = check_int("max_fit_rows", max_fit_rows, minimum=1, allow_none=True)
    rows = fit_subsample(n, max_fit_rows, random_state)
    sample = read_rows(rows)
    pca = None
    metadata: Dict[str, Any] = {"reduce_dim": None, "criterion": None, "n_components_scores": None}
    if reduce_dim is not None:
        reduce_dim = check_int("reduce_dim", reduce_dim, minimum=1)
        if reduce_dim > d:
            fail("reduce_dim", f"an integer <= the embedding dimension {d}", reduce_dim)
        pca = pca_fit(sample, reduce_dim)
        sample = pca_project(sample, pca)
        metadata["reduce_dim"] = reduce_dim
    options = dict(gmm_options, random_state=random_state)
    metadata["fit_rows"] = int(sample.shape[0])
    gmm = None
    if n_components is None:
        check_option("criterion", criterion, CRITERIA)
        values = [check_int("candidates", m, minimum=1) for m in candidates]
        values = list(dict.fromkeys(m for m in values if m <= len(sample))) or [1]
        scores: Dict[int, float] = {}
        degenerate: Dict[int, float] = {}  # M -> rows of its smallest component, when too few
        need = rows_per_component(options.get("covariance_type", "full"), sample.shape[1])
        models = _bar(fit_candidates(sample.detach().double(), values, criterion, options), progress,
                      f"{criterion.upper()} choice of M", len(values), "fit")
        kept: Dict[bool, Any] = {}  # the best fit so far among the large-enough candidates (True) and of all
        for m, model, score in models:
            scores[m] = score
            smallest = float(model.weights_.min()) * len(sample)
            if m > 1 and smallest < need:
                degenerate[m] = smallest
            for large_only in (True, False):
                pool = [k for k in scores if not (large_only and k in degenerate)]
                if m in pool and m == min(pool, key=lambda k: (scores[k], k)):
                    kept[large_only] = model
        by_score = lambda m: (scores[m], m)  # noqa: E731 (ties go to the smaller M)
        own_choice = min(scores, key=by_score)
        allowed = [m for m in scores if m not in degenerate]
        best = min(allowed, key=by_score) if allowed else own_choice
        gmm = kept[bool(allowed)]
        metadata["criterion"] = criterion
        metadata["n_components_scores"] = {str(m): float(s) for m, s in scores.items()}
        metadata["n_components_degenerate"] = {str(m): rows for m, rows in degenerate.items()}
        if own_choice in degenerate:
            warn_degenerate(field, criterion, degenerate, need, best if allowed else None)
        n_components = best
        if best == 1 and len(scores) > 1:
            metadata["dca_inert"] = warn_dca_inert(field, criterion, scores)
    n_components = check_int("n_components", n_components, minimum=1)
    if n_components > len(sample):
        fail("n_components", f"at most the number of rows ({len(sample)})", n_components)
    if gmm is None:
        for _ in _bar(range(1), progress, f"EM fit (M={n_components})", 1, "fit"):
            gmm = GaussianMixture(n_components, **options).fit(sample)
    metadata["n_components"] = n_components
    metadata["gmm_converged"] = bool(gmm.converged_)
    return FittedMixture(gmm, None, pca, metadata)


def gmm_state(gmm: Any) -> Tuple[Optional[Dict[str, Any]], Dict[str, torch.Tensor]]:
    """JSON settings and tensors of a fitted GaussianMixture (None, {} when there is none)."""
    if gmm is None or not hasattr(gmm, "precisions_cholesky_"):
        return None, {}
    config = {key: getattr(gmm, key) for key in _CONFIG_KEYS}
    rs = getattr(gmm, "random_state", None)
    config["random_state"] = int(rs) if isinstance(rs, int) and not isinstance(rs, bool) else None
    facts = {}
    for key in _FACT_KEYS:
        value = getattr(gmm, key, None)
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        facts[key] = value.item() if isinstance(value, torch.Tensor) else value
    config["fitted"] = facts
    tensors = {key: getattr(gmm, key) for key in _TENSOR_KEYS if isinstance(getattr(gmm, key, None), torch.Tensor)}
    return config, tensors


def gmm_from_state(config: Optional[Dict[str, Any]], tensors: Dict[str, torch.Tensor]) -> Any:
    """Rebuild the fitted GaussianMixture written by :func:`gmm_state` (None if none was saved)."""
    if not config:
        return None
    gmm = GaussianMixture(**{key: config[key] for key in _CONFIG_KEYS}, random_state=config.get("random_state"))
    missing = [key for key in _TENSOR_KEYS[:4] if key not in tensors]
    if missing:
        fail("bank.safetensors", "the fitted GMM tensors " + ", ".join(_TENSOR_KEYS[:4]),
             "missing " + ", ".join(missing), raw=True)
    for key, value in tensors.items():
        setattr(gmm, key, value)
    for key, value in (config.get("fitted") or {}).items():
        setattr(gmm, key, value)
    return gmm
