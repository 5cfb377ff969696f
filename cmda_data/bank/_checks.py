"""Validation of what an EmbeddingBank stores (private).

:func:`check_gmm_state` checks a saved Gaussian mixture (the settings from ``bank.json`` and
the tensors from ``bank.safetensors``) before it is rebuilt: it raises
:class:`~cmda_data.BankFormatError` naming the file at fault.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..core._em import COVARIANCE_TYPES, INIT_PARAMS
from ..core._validation import check_int, check_option, check_tensor_data, describe, fail
from ..core.mixture import CRITERIA, GaussianMixture
from ..exceptions import BankFormatError, ShapeError
from ._fit import _CONFIG_KEYS, _FACT_KEYS, _TENSOR_KEYS, fit_model

__all__ = ["as_tensor", "check_bank_indices", "check_embeddings", "check_fit_options", "check_gmm_state",
           "check_roles", "count_non_finite"]

#: elements per block when counting non-finite values (a few MiB of temporaries at most)
_BLOCK = 1 << 20


def count_non_finite(tensor: torch.Tensor) -> int:
    """Number of NaN / infinite entries, with memory flat in the tensor's size.

    ``torch.isfinite`` on a whole ``[N, d]`` table allocates temporaries larger than the table
    (a 2 GB bank would need 2.5 GB more); a finite sum proves every entry finite (NaN and
    infinities propagate), and only a non-finite sum (a NaN, or an overflow) is counted block
    by block.

    Examples:
        >>> count_non_finite(torch.tensor([1.0, float("nan"), float("inf")])), count_non_finite(torch.ones(3))
        (2, 0)
    """
    if not tensor.is_floating_point() or tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return 0
    flat = tensor.reshape(-1)
    return sum(int((~torch.isfinite(flat[i:i + _BLOCK])).sum()) for i in range(0, flat.numel(), _BLOCK))


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


def check_embeddings(embeddings: Any, *, values: bool = True) -> Dict[str, torch.Tensor]:
    """modality -> float32 ``[N, d]``: same N and d everywhere, finite values (unless ``values=False``:
    checked already, e.g. by the bank loader, which reads them from the file)."""
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
        check_tensor_data(name, tensor)
        bad = count_non_finite(tensor) if values else 0
        if bad:
            fail(name, "finite values (no NaN or inf)", f"{bad} non-finite entries in {describe(tensor)}", raw=True)
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


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


#: bank.json "gmm" settings: key -> (check, what is expected)
_SETTINGS = {
    "n_components": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "covariance_type": (lambda v: v in COVARIANCE_TYPES, "one of " + ", ".join(COVARIANCE_TYPES)),
    "tol": (_is_number, "a finite number >= 0"),
    "reg_covar": (_is_number, "a finite number >= 0"),
    "max_iter": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "n_init": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "init_params": (lambda v: v in INIT_PARAMS, "one of " + ", ".join(INIT_PARAMS)),
    "random_state": (lambda v: v is None or _is_int(v, 0) and v < 2 ** 63, "null or an integer in [0, 2**63)"),
    "fitted": (lambda v: isinstance(v, dict) and set(v) <= set(_FACT_KEYS), "an object with keys among "
               + ", ".join(_FACT_KEYS)),
}
_FACTS = {
    "converged_": (lambda v: v is None or isinstance(v, bool), "null, true or false"),
    "n_iter_": (lambda v: v is None or _is_int(v, 0), "null or an integer >= 0"),
    "lower_bound_": (lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool), "null or a number"),
    "n_features_in_": (lambda v: v is None or _is_int(v, 1), "null or an integer >= 1"),
}


def _check_settings(config: Any, where: str) -> None:
    if not isinstance(config, dict):
        fail(f"{where}: gmm", "null or a JSON object", config, BankFormatError)
    missing = [key for key in _CONFIG_KEYS if key not in config]
    unknown = sorted(set(config) - set(_SETTINGS) - set(_CONFIG_KEYS))
    if missing or unknown:
        fail(f"{where}: gmm", "the settings " + ", ".join(_CONFIG_KEYS) + " (and random_state, fitted)",
             "; ".join(filter(None, ["missing " + ", ".join(missing) if missing else "",
                                     "unknown " + ", ".join(map(repr, unknown)) if unknown else ""])),
             BankFormatError, raw=True)
    for key, value in config.items():
        check, expected = _SETTINGS[key]
        if not check(value):
            fail(f"{where}: gmm.{key}", expected, value, BankFormatError)
    for key, value in (config.get("fitted") or {}).items():
        check, expected = _FACTS[key]
        if not check(value):
            fail(f"{where}: gmm.fitted.{key}", expected, value, BankFormatError)


def check_gmm_state(config: Optional[Dict[str, Any]], tensors: Mapping[str, torch.Tensor], *, features: int,
                    components: Optional[int], config_file: str, tensor_file: str) -> None:
    """A saved GMM agrees with itself and with the bank; raise BankFormatError naming the file.

    Settings (``config_file``): every key of the right type, nothing unknown; ``n_components``
    equals the responsibilities' M and ``n_features_in_`` the fitted dimension ``features``
    (the PCA rank, else d). Tensors (``tensor_file``): the four fitted tensors present (plus
    ``precisions_``), each of the shape its ``covariance_type`` gives, finite; weights a
    probability vector; precision Cholesky factors upper-triangular with a positive diagonal
    (so the precisions are positive definite) and ``precisions_ = P P^T``; covariances
    positive definite.

    Examples:
        >>> check_gmm_state(None, {}, features=2, components=None, config_file="bank.json",
        ...                 tensor_file="bank.safetensors")  # no GMM saved: nothing to check
    """
    if config is None:
        if components is not None:
            fail(f"{config_file}: gmm", f"the settings of the GMM behind the responsibilities (M = {components})",
                 None, BankFormatError)
        if tensors:
            fail(tensor_file, "no gmm.* tensors (bank.json saves no GMM)", ", ".join(sorted(tensors)),
                 BankFormatError, raw=True)
        return
    _check_settings(config, config_file)
    M, kind, f = config["n_components"], config["covariance_type"], features
    if components is not None and M != components:
        fail(f"{config_file}: gmm.n_components", f"{components}, the M of the responsibilities [N, M]", M,
             BankFormatError)
    fitted_features = (config.get("fitted") or {}).get("n_features_in_")
    if fitted_features is not None and fitted_features != f:
        fail(f"{config_file}: gmm.fitted.n_features_in_", f"{f}, the dimension the GMM sees", fitted_features,
             BankFormatError)
    shapes = {"full": (M, f, f), "tied": (f, f), "diag": (M, f), "spherical": (M,)}
    expected = {"weights_": (M,), "means_": (M, f), "covariances_": shapes[kind],
                "precisions_cholesky_": shapes[kind], "precisions_": shapes[kind]}
    missing = [key for key in _TENSOR_KEYS[:4] if key not in tensors]
    unknown = sorted(set(tensors) - set(_TENSOR_KEYS))
    if missing or unknown:
        fail(tensor_file, "the GMM tensors " + ", ".join(f"gmm.{k}" for k in _TENSOR_KEYS),
             "; ".join(filter(None, ["missing " + ", ".join(missing) if missing else "",
                                     "unknown " + ", ".join(unknown) if unknown else ""])), BankFormatError, raw=True)
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or tuple(tensor.shape) != expected[key]:
            fail(f"{tensor_file}: tensor 'gmm.{key}'", f"a float tensor of shape {list(expected[key])} "
                 f"(n_components={M}, covariance_type={kind!r}, {f} features)", tensor, BankFormatError)
        if not bool(torch.isfinite(tensor).all()):
            fail(f"{tensor_file}: tensor 'gmm.{key}'", "finite values", "NaN or infinity", BankFormatError, raw=True)
    _check_gmm_values({key: t.double() for key, t in tensors.items()}, kind, tensor_file)


def _check_gmm_values(t: Mapping[str, torch.Tensor], kind: str, tensor_file: str) -> None:
    def bad(key: str, expected: str, got: str) -> None:
        fail(f"{tensor_file}: tensor 'gmm.{key}'", expected, got, BankFormatError, raw=True)

    weights = t["weights_"]
    if bool((weights < 0).any()) or abs(float(weights.sum()) - 1.0) > 1e-5:
        bad("weights_", "non-negative weights that sum to 1", f"min {float(weights.min()):.6g}, "
            f"sum {float(weights.sum()):.8g}")
    chol = t["precisions_cholesky_"]
    if kind in ("full", "tied"):
        diagonal = chol.diagonal(dim1=-2, dim2=-1)
        if bool((torch.tril(chol, -1) != 0).any()) or not bool((diagonal > 0).all()):
            bad("precisions_cholesky_", "upper-triangular factors with a positive diagonal (positive-definite "
                "precisions)", "a factor that is not")
        precisions = chol @ chol.mT
        spd = bool((torch.linalg.cholesky_ex(t["covariances_"]).info == 0).all())
        symmetric = torch.allclose(t["covariances_"], t["covariances_"].mT, rtol=1e-6, atol=0.0)
        if not (spd and symmetric):
            bad("covariances_", "symmetric positive-definite covariances", "a matrix that is not")
    else:
        if not bool((chol > 0).all()):
            bad("precisions_cholesky_", "positive values (positive-definite precisions)",
                f"minimum {float(chol.min()):.6g}")
        precisions = chol * chol
        if not bool((t["covariances_"] > 0).all()):
            bad("covariances_", "positive variances", f"minimum {float(t['covariances_'].min()):.6g}")
    if "precisions_" in t:
        scale = float(precisions.abs().max()) or 1.0
        if not bool(((t["precisions_"] - precisions).abs() <= 1e-6 * scale).all()):
            bad("precisions_", "P @ P.T of precisions_cholesky_ (P)", "different values")


def check_fit_options(options: Mapping[str, Any], owner: str) -> None:
    """Check the GMM options of ``owner`` (``EmbeddingBank.build`` or ``from_embeddings``) up front.

    ``options``: ``fit_on``, ``fit_gmm``, the keywords of :func:`~cmda_data.bank._fit.fit_model`
    (``n_components``, ``reduce_dim``, ``criterion``, ``max_fit_rows``, ...) and
    :class:`~cmda_data.GaussianMixture` settings. The fit checks them too, but only after every
    row was embedded: a typo would throw that pass away. ``fit_on`` needs the modalities: the
    caller resolves it.
    """
    own = [name for name, p in inspect.signature(fit_model).parameters.items()
           if p.kind is p.KEYWORD_ONLY and name != "field"]
    settings = [name for name in inspect.signature(GaussianMixture).parameters
                if name not in ("n_components", "random_state")]
    unknown = [key for key in options if key not in own + settings + ["fit_on", "fit_gmm"]]
    if unknown:
        fail(unknown[0], f"a keyword argument of {owner} or a GaussianMixture setting ({', '.join(settings)})",
             options[unknown[0]])
    if not isinstance(options.get("fit_gmm", True), bool):
        fail("fit_gmm", "True or False", options["fit_gmm"])
    for name in ("n_components", "reduce_dim", "max_fit_rows"):
        check_int(name, options.get(name), minimum=1, allow_none=True)
    if "criterion" in options:
        check_option("criterion", options["criterion"], CRITERIA)
    GaussianMixture(1, random_state=options.get("random_state"), **{k: options[k] for k in settings if k in options})
