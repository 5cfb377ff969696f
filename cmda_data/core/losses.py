"""Contrastive losses that learn the common latent space (paper Eq. 7, 8, 9).

Every loss takes the latents of one batch as a mapping ``{modality: Tensor[m, d]}`` (or a
list of ``[m, d]`` tensors): row ``i`` of every modality belongs to sample ``i``. The rows
are L2-normalised inside (``F.normalize``), so ``z_i^p . z_l^q`` is the cosine similarity
``sim`` of the paper. All sums of exponentials are computed with ``logsumexp``, so small
temperatures never overflow. Computation runs in float32 at least (float64 stays
float64); the loss is returned in the dtype of the latents.

``reduction`` is ``"mean"`` (default; the official code averages), ``"sum"`` (Eq. 9 sums
``l_i`` over the samples) or ``"none"`` (the per-sample ``l_i``, shape ``[m]``).

* :func:`eq7_loss` - unsupervised, exactly Eq. 7: cross-modal negatives only
  (``p != q``), the positive pair excluded from the denominator (``l != i``).
* :func:`eq8_loss` - supervised, Eq. 8: every sample of the same class is a positive.
* :func:`supcon_loss` - the official code's ``SupConLoss`` (contrast mode ``"all"``,
  ``tau = 0.5``, scaled by ``tau / base_temperature``, positive in the denominator,
  same-modality negatives included), for parity with the authors' numbers.
* :func:`joint_loss` - Eq. 9: ``task_loss + lam * align_loss``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..exceptions import ShapeError, ValidationError
from ._validation import check_finite, check_float_tensor, check_option, check_positive_float, check_rank, fail

__all__ = ["eq7_loss", "eq8_loss", "joint_loss", "supcon_loss"]

Latents = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]

_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------
# input handling (private)
# ---------------------------------------------------------------------------------------
def _stack_latents(latents: Latents, name: str = "latents") -> tuple[torch.Tensor, torch.dtype]:
    """Validate the per-modality latents; return unit rows ``[K, m, d]`` and the input dtype."""
    if isinstance(latents, Mapping):
        items = [(f"{name}[{key!r}]", value) for key, value in latents.items()]
    elif isinstance(latents, (list, tuple)):
        items = [(f"{name}[{k}]", value) for k, value in enumerate(latents)]
    else:
        fail(name, "a dict or list of [m, d] tensors, one per modality", latents)
    if len(items) < 2:
        fail(name, "at least 2 modalities", f"{len(items)} modalit{'y' if len(items) == 1 else 'ies'}",
             ValidationError, raw=True)
    first_name, first = items[0]
    for item_name, value in items:
        check_float_tensor(item_name, value)
        check_rank(item_name, value, 2)
        if value.shape != first.shape:
            fail(item_name, f"shape {tuple(first.shape)} like {first_name}", f"shape {tuple(value.shape)}",
                 ShapeError, raw=True)
        if value.device != first.device:
            fail(item_name, f"a tensor on {first.device} like {first_name}", f"a tensor on {value.device}",
                 ShapeError, raw=True)
    if first.shape[0] < 2:
        fail(name, "at least 2 samples per modality (the loss contrasts a sample with the others)",
             f"{first.shape[0]} sample(s)", ShapeError, raw=True)
    dtype = first.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    z = torch.stack([value.to(work) for _, value in items])
    return F.normalize(z, dim=-1), dtype


def _check_labels(labels: torch.Tensor, m: int, device: torch.device, name: str = "labels") -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            fail(name, "a 1-D integer tensor of class indices", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        fail(name, "a 1-D integer tensor of class indices", labels)
    check_rank(name, labels, 1)
    if labels.shape[0] != m:
        fail(name, f"one label per sample ({m})", f"{labels.shape[0]} labels", ShapeError, raw=True)
    return labels.to(device)


def _reduce(per_sample: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    if reduction == "mean":
        out = per_sample.mean()
    elif reduction == "sum":
        out = per_sample.sum()
    else:
        out = per_sample
    return out.to(dtype)


# ---------------------------------------------------------------------------------------
# Eq. 7 and Eq. 8
# ---------------------------------------------------------------------------------------
def _cross_log_terms(z: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``log sum_{p != q} e(i, j)^{p, q}`` as ``[m, m]`` and the Eq. 7/8 log-denominator ``[m]``."""
    K, m = z.shape[0], z.shape[1]
    p, q = torch.nonzero(~torch.eye(K, dtype=torch.bool, device=z.device), as_tuple=True)
    logits = torch.bmm(z[p], z[q].transpose(1, 2)) / tau  # [K(K-1), m, m]: sim(z_i^p, z_l^q) / tau
    # log sum over p != q of e(i, j)^{p, q}: [m, m]
    pair = torch.logsumexp(logits, dim=0)
    other = ~torch.eye(m, dtype=torch.bool, device=z.device)
    denominator = torch.logsumexp(pair.masked_fill(~other, float("-inf")), dim=1)  # l != i
    return pair, denominator


def eq7_loss(latents: Latents, *, tau: float = 0.5, reduction: str = "mean") -> torch.Tensor:
    r"""Unsupervised multimodal InfoNCE of the paper's Eq. 7.

    For K modalities and m samples,

    .. math::
        \ell_i = -\log \frac{\sum_{p \ne q} \exp(\mathrm{sim}(z_i^p, z_i^q)/\tau)}
                            {\sum_{p \ne q} \sum_{l \ne i} \exp(\mathrm{sim}(z_i^p, z_l^q)/\tau)}

    Only cross-modal pairs appear (``p != q``), and the positive pair is *not* in the
    denominator. Unlike NT-Xent the loss can therefore be negative.

    Args:
        latents: ``{modality: Tensor[m, d]}`` or a list of ``[m, d]`` tensors (K >= 2,
            m >= 2); rows are L2-normalised inside.
        tau: temperature (> 0).
        reduction: ``"mean"`` (default), ``"sum"`` (Eq. 9) or ``"none"`` (``[m]``).

    Returns:
        The loss, in the dtype of the latents.

    Examples:
        >>> z_img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> z_txt = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
        >>> round(eq7_loss({"image": z_img, "text": z_txt}, tau=0.5).item(), 4)
        -1.7911
    """
    check_positive_float("tau", tau)
    check_option("reduction", reduction, _REDUCTIONS)
    z, dtype = _stack_latents(latents)
    pair, denominator = _cross_log_terms(z, float(tau))
    numerator = torch.diagonal(pair)
    return _reduce(denominator - numerator, reduction, dtype)


def eq8_loss(latents: Latents, labels: torch.Tensor, *, tau: float = 0.5, reduction: str = "mean",
             normalize_by: str = "paper") -> torch.Tensor:
    r"""Supervised multimodal contrastive loss of the paper's Eq. 8.

    .. math::
        \ell_i = \frac{-1}{m_{y_i} - 1} \sum_{j: y_j = y_i}
            \log \frac{\sum_{p \ne q} e(i, j)^{p, q}}
                      {\sum_{p \ne q} \sum_{l \ne i} e(i, l)^{p, q}},
        \quad e(i, j)^{p, q} = \exp(\mathrm{sim}(z_i^p, z_j^q) / \tau)

    The sum over ``j`` includes ``j = i`` as the paper writes it (the cross-modal pair of
    sample ``i`` is a positive), and the denominator is the one of Eq. 7.

    Classes with one sample in the batch (``m_{y_i} = 1``) would divide by zero. We define
    their normaliser as 1 instead, so such a sample gets exactly its Eq. 7 term (its only
    positive is its own pair). ``normalize_by="positives"`` divides by the number of
    positives ``m_{y_i}`` instead (a plain mean over the positives). With all labels
    distinct, the loss then equals :func:`eq7_loss`.

    Args:
        latents: ``{modality: Tensor[m, d]}`` or a list of ``[m, d]`` tensors.
        labels: integer class of each sample, shape ``[m]``.
        tau: temperature (> 0).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        normalize_by: ``"paper"`` (``max(m_{y_i} - 1, 1)``) or ``"positives"`` (``m_{y_i}``).

    Examples:
        >>> z_img = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> z_txt = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.1, 1.0]])
        >>> labels = torch.tensor([0, 0, 1])
        >>> eq8_loss({"image": z_img, "text": z_txt}, labels, reduction="none").shape
        torch.Size([3])
    """
    check_positive_float("tau", tau)
    check_option("reduction", reduction, _REDUCTIONS)
    check_option("normalize_by", normalize_by, ("paper", "positives"))
    z, dtype = _stack_latents(latents)
    labels = _check_labels(labels, z.shape[1], z.device)
    pair, denominator = _cross_log_terms(z, float(tau))
    same = labels[:, None] == labels[None, :]  # includes j == i
    log_ratio = pair - denominator[:, None]
    positive_sum = torch.where(same, log_ratio, torch.zeros_like(log_ratio)).sum(dim=1)
    count = same.sum(dim=1).to(z.dtype)
    norm = count if normalize_by == "positives" else (count - 1).clamp(min=1)
    return _reduce(-positive_sum / norm, reduction, dtype)


# ---------------------------------------------------------------------------------------
# official-code parity: SupConLoss, contrast_mode "all"
# ---------------------------------------------------------------------------------------
def supcon_loss(latents: Latents, labels: Optional[torch.Tensor] = None, *, tau: float = 0.5,
                base_temperature: Optional[float] = 0.07, reduction: str = "mean") -> torch.Tensor:
    r"""SupCon / NT-Xent as the official CMDA code computes it (``SupConLoss``, mode ``"all"``).

    The K modality views of the m samples form ``K * m`` anchors. For anchor ``a`` with
    positives ``P(a)`` (the other views of the same sample, or with ``labels`` of the same
    class) and all other views ``A(a)`` (same-modality views included, positives included):

    .. math::
        \ell_a = -\frac{\tau}{\tau_b} \frac{1}{|P(a)|} \sum_{p \in P(a)}
            \log \frac{\exp(z_a \cdot z_p / \tau)}{\sum_{b \in A(a)} \exp(z_a \cdot z_b / \tau)}

    The factor ``tau / base_temperature`` (0.5 / 0.07, about 7.14, in the code) is kept
    for parity; ``base_temperature=None`` drops it. ``reduction="none"`` returns the mean
    of the K anchors of each sample (shape ``[m]``), so ``"mean"`` equals the code's
    mean over all ``K * m`` anchors.

    Args:
        latents: ``{modality: Tensor[m, d]}`` or a list of ``[m, d]`` tensors.
        labels: optional integer classes ``[m]`` (supervised SupCon); ``None`` = SimCLR.
        tau: temperature (the code uses 0.5).
        base_temperature: scale denominator (0.07 in the code) or ``None``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Examples:
        >>> z_img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> z_txt = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
        >>> round(supcon_loss([z_img, z_txt]).item(), 4)
        2.0706
    """
    check_positive_float("tau", tau)
    check_positive_float("base_temperature", base_temperature, allow_none=True)
    check_option("reduction", reduction, _REDUCTIONS)
    z, dtype = _stack_latents(latents)
    K, m = z.shape[0], z.shape[1]
    tau = float(tau)
    scale = 1.0 if base_temperature is None else tau / float(base_temperature)
    if labels is None:
        sample = torch.arange(m, device=z.device)
    else:
        sample = _check_labels(labels, m, z.device)
    flat = z.reshape(K * m, -1)  # modality-major, like torch.cat(torch.unbind(features, 1))
    ids = sample.repeat(K)
    logits = flat @ flat.T / tau
    not_self = ~torch.eye(K * m, dtype=torch.bool, device=z.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    positive = (ids[:, None] == ids[None, :]) & not_self
    mean_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(1) / positive.sum(1)
    per_anchor = -scale * mean_log_prob
    return _reduce(per_anchor.reshape(K, m).mean(0), reduction, dtype)


# ---------------------------------------------------------------------------------------
# Eq. 9
# ---------------------------------------------------------------------------------------
def joint_loss(task_loss: torch.Tensor, align_loss: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    r"""The joint objective of Eq. 9: ``L = L_f + lam * L_g``.

    Args:
        task_loss: the downstream-task loss ``L_f`` (a scalar tensor).
        align_loss: the latent-space loss ``L_g`` (Eq. 7 or 8; the paper sums it over the
            batch, use ``reduction="sum"`` for the literal form).
        lam: weight ``lambda`` (the paper fixes 0.1), >= 0.

    Examples:
        >>> joint_loss(torch.tensor(2.0), torch.tensor(5.0))
        tensor(2.5000)
    """
    check_positive_float("lam", lam, allow_zero=True)
    for name, value in (("task_loss", task_loss), ("align_loss", align_loss)):
        check_float_tensor(name, value, finite=False)
        if value.numel() != 1:
            fail(name, "a scalar loss tensor", value, ShapeError)
        check_finite(name, value)
    return task_loss + float(lam) * align_loss.reshape(task_loss.shape).to(task_loss.dtype)
