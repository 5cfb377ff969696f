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
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from ..core._validation import check_int, fail
from ..core.mixture import GaussianMixture, select_n_components
from ..exceptions import CMDAWarning

__all__ = ["FittedMixture", "fit_mixture", "gmm_from_state", "gmm_state", "pca_fit", "pca_project",
           "warn_dca_inert"]

_CONFIG_KEYS = ("n_components", "covariance_type", "tol", "reg_covar", "max_iter", "n_init", "init_params")
_TENSOR_KEYS = ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_")
_FACT_KEYS = ("converged_", "n_iter_", "lower_bound_", "n_features_in_")


@dataclass
class FittedMixture:
    gmm: Any
    responsibilities: torch.Tensor
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


def fit_mixture(x: torch.Tensor, *, n_components: Optional[int], candidates: Iterable[int],
                reduce_dim: Optional[int], random_state: Any = 0, criterion: str = "bic",
                field: Optional[str] = None, **gmm_options: Any) -> FittedMixture:
    """Fit the GMM on ``x`` [N, d]; M by ``criterion`` over ``candidates`` when None.

    When the criterion picks M = 1 out of several candidates, a :class:`~cmda_data.CMDAWarning`
    names ``field`` and the scores, and ``metadata["dca_inert"]`` keeps its message.
    """
    n, d = x.shape
    pca = None
    metadata: Dict[str, Any] = {"reduce_dim": None, "criterion": None, "n_components_scores": None}
    if reduce_dim is not None:
        reduce_dim = check_int("reduce_dim", reduce_dim, minimum=1)
        if reduce_dim > d:
            fail("reduce_dim", f"an integer <= the embedding dimension {d}", reduce_dim)
        pca = pca_fit(x, reduce_dim)
        x = pca_project(x, pca)
        metadata["reduce_dim"] = reduce_dim
    options = dict(gmm_options, random_state=random_state)
    if n_components is None:
        values = [check_int("candidates", m, minimum=1) for m in candidates]
        values = [m for m in values if m <= n] or [1]
        best, scores = select_n_components(x, values, criterion=criterion, **options)
        metadata["criterion"] = criterion
        metadata["n_components_scores"] = {str(m): float(s) for m, s in scores.items()}
        n_components = best
        if best == 1 and len(scores) > 1:
            metadata["dca_inert"] = warn_dca_inert(field, criterion, scores)
    n_components = check_int("n_components", n_components, minimum=1)
    if n_components > n:
        fail("n_components", f"at most the number of rows ({n})", n_components)
    gmm = GaussianMixture(n_components, **options).fit(x)
    resp = gmm.predict_proba(x).float().contiguous()
    metadata["n_components"] = n_components
    metadata["gmm_converged"] = bool(gmm.converged_)
    return FittedMixture(gmm, resp, pca, metadata)


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
