"""Paired statistics for comparing training methods that share seeds.

When two methods are trained on the same seeds, seed ``i`` of method ``a`` and seed ``i``
of method ``b`` share their data order and initialisation, so the right comparison is the
*paired* one: a Student-t analysis of the per-seed differences ``a[i] - b[i]``.

* :func:`t_cdf`, :func:`t_ppf` - Student's t distribution (CDF and quantile), pure Python
  (regularized incomplete beta by continued fraction), so the library needs no scipy.
* :func:`paired_comparison` - mean difference, confidence half-width and two-sided paired
  t-test p-value of two index-aligned per-seed result lists.
* :func:`holm` - Holm-Bonferroni step-down adjusted p-values.
* :func:`compare_methods` - every method against a reference (``base``) and every CMDA
  method against its teacher control, Holm's correction over all of them: the ``paired``
  and ``teacher_effect`` blocks of the benchmark results and of ``cmda probe``.

Every result is made of plain Python ``float``/``int``/``None``, so it serialises to JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .core._validation import fail

__all__ = ["TEACHER_PAIRS", "compare_methods", "holm", "paired_comparison", "t_cdf", "t_ppf"]

_EPS = 1e-16
_TINY = 1e-300
_MAX_ITER = 10_000


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITER + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float, y: float, log_x: float, log_y: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)``, given ``y = 1 - x`` and both logarithms
    (computed by the caller without cancellation or underflow)."""
    if y <= 0.0:
        return 1.0
    if x <= 0.0 and log_x == -math.inf:
        return 0.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * log_x + b * log_y
    if x > (a + 1.0) / (a + b + 2.0):  # symmetry switch: the fraction converges fast for the other side
        return 1.0 - math.exp(log_front) * _beta_cf(b, a, y) / b
    return math.exp(log_front) * _beta_cf(a, b, x) / a


def _t_sf(t: float, dof: float) -> float:
    """Upper tail ``P(T > t)`` for ``t >= 0``, accurate far into the tail."""
    if t == math.inf:
        return 0.0
    s = t / math.sqrt(dof)
    if s <= 1.0:  # x = 1 / (1 + s^2), y = s^2 / (1 + s^2)
        log_x = -math.log1p(s * s)
        log_y = 2.0 * math.log(s) + log_x if s > 0.0 else -math.inf
    else:  # with r = 1 / s: x = r^2 / (1 + r^2), y = 1 / (1 + r^2)
        r = 1.0 / s
        log_y = -math.log1p(r * r)
        log_x = 2.0 * math.log(r) + log_y
    return 0.5 * _betainc(0.5 * dof, 0.5, math.exp(log_x), math.exp(log_y), log_x, log_y)


def _check_dof(dof: Any) -> float:
    if isinstance(dof, bool) or not isinstance(dof, (int, float, np.integer, np.floating)) or not (
        math.isfinite(dof) and dof > 0
    ):
        fail("dof", "a finite number > 0", dof)
    return float(dof)


def t_cdf(t: float, dof: float) -> float:
    """CDF of Student's t distribution with ``dof`` degrees of freedom.

    Args:
        t: the point (``+/-inf`` allowed, NaN refused).
        dof: degrees of freedom, a finite number > 0 (need not be an integer).

    Returns:
        ``P(T <= t)`` as a float.

    Examples:
        >>> t_cdf(0.0, 5)
        0.5
        >>> t_cdf(2.0, 10)
        0.963306...
        >>> t_cdf(-math.inf, 3)
        0.0
    """
    dof = _check_dof(dof)
    t = float(t)
    if math.isnan(t):
        fail("t", "a number (not NaN)", t)
    sf = _t_sf(abs(t), dof)
    return sf if t < 0 else 1.0 - sf


def t_ppf(q: float, dof: float) -> float:
    """Quantile (inverse CDF) of Student's t distribution.

    The upper tail is inverted by bracketing (doubling from ``[0, 1]``) and bisection to
    a relative precision of about ``1e-13``.

    Args:
        q: the probability, strictly between 0 and 1.
        dof: degrees of freedom, a finite number > 0.

    Returns:
        ``t`` such that ``t_cdf(t, dof) == q``.

    Examples:
        >>> t_ppf(0.975, 10)
        2.228139
        >>> t_ppf(0.5, 3)
        0.0
        >>> t_ppf(0.025, 10)
        -2.228139
    """
    dof = _check_dof(dof)
    q = float(q)
    if not 0.0 < q < 1.0:
        fail("q", "a probability strictly between 0 and 1", q)
    if q == 0.5:
        return 0.0
    p = min(q, 1.0 - q)  # solve P(T > t) = p for t > 0, then fix the sign
    lo, hi = 0.0, 1.0
    while _t_sf(hi, dof) > p:
        lo, hi = hi, 2.0 * hi
    for _ in range(2_000):
        mid = 0.5 * (lo + hi)
        if hi - lo <= 1e-13 * hi or mid in (lo, hi):
            break
        if _t_sf(mid, dof) > p:
            lo = mid
        else:
            hi = mid
    root = 0.5 * (lo + hi)
    return root if q > 0.5 else -root


def _as_vector(name: str, values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        if values.ndim != 1:
            fail(name, "a 1-d tensor", values)
        array = values.detach().cpu().double().numpy()
    else:
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            fail(name, "a 1-d sequence of floats", values)
        if array.ndim != 1:
            fail(name, "a 1-d sequence of floats", values)
    if not np.all(np.isfinite(array)):
        fail(name, "finite values", values)
    return array


def _check_level(level: Any) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0.0 < level < 1.0:
        fail("level", "a confidence level strictly between 0 and 1", level)
    return float(level)


def paired_comparison(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> dict[str, Any]:
    """Paired Student-t comparison of two methods evaluated on the same seeds.

    Args:
        a: per-seed results of the first method (list, tuple, ndarray or 1-d tensor).
        b: per-seed results of the second method, index-aligned with ``a``.
        level: confidence level of the interval (its half-width is still keyed ``"ci95"``).

    Returns:
        ``{"delta": mean(a - b), "ci95": half-width of the two-sided interval of the mean
        difference, "p": two-sided paired t-test p-value, "n": number of seeds}``. With one
        seed ``ci95`` and ``p`` are ``None``; when every difference is the same, ``ci95``
        is ``0.0`` and ``p`` is ``1.0`` if that difference is 0, else ``0.0``.

    Raises:
        ValidationError: empty input, lengths that differ, non-finite values, bad ``level``.

    Examples:
        >>> paired_comparison([0.80, 0.82, 0.79], [0.78, 0.80, 0.78])
        {'delta': 0.01666..., 'ci95': 0.01434..., 'p': 0.0377..., 'n': 3}
        >>> paired_comparison([1.0], [0.5])
        {'delta': 0.5, 'ci95': None, 'p': None, 'n': 1}
    """
    level = _check_level(level)
    x, y = _as_vector("a", a), _as_vector("b", b)
    n = int(x.shape[0])
    if n == 0:
        fail("a", "at least one value", a)
    if y.shape[0] != n:
        fail("b", f"{n} values (the length of a)", b)
    d = x - y
    if np.all(d == d[0]):
        delta = float(d[0])
        if n == 1:
            return {"delta": delta, "ci95": None, "p": None, "n": n}
        return {"delta": delta, "ci95": 0.0, "p": 1.0 if delta == 0.0 else 0.0, "n": n}
    delta = float(np.mean(d))
    se = float(np.std(d, ddof=1)) / math.sqrt(n)
    half = t_ppf(0.5 * (1.0 + level), n - 1) * se
    p = min(1.0, 2.0 * _t_sf(abs(delta) / se, n - 1))
    return {"delta": delta, "ci95": half, "p": p, "n": n}


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni step-down adjusted p-values.

    Args:
        pvalues: raw p-values in ``[0, 1]``; ``None`` entries stay ``None`` and do not count
            in the number of hypotheses ``m``.

    Returns:
        The adjusted p-values in input order: ``min(1, max_{j <= i} (m - j) p_(j))`` over
        the ascending order ``p_(0) <= p_(1) <= ...``.

    Examples:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
        >>> holm([0.2, None, 0.9])
        [0.4, None, 0.9]
    """
    for value in pvalues:
        if value is None:
            continue
        try:
            ok = not isinstance(value, bool) and 0.0 <= float(value) <= 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            fail("pvalues", "probabilities in [0, 1] or None", value)
    present = sorted((float(p), i) for i, p in enumerate(pvalues) if p is not None)
    m = len(present)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


#: (method, its uninformative-teacher control): the pipeline is the method's, only the teacher
#: differs (see :mod:`cmda_data.controls`)
TEACHER_PAIRS = (("cmda", "random_teacher"), ("cmda", "shuffled_teacher"),
                 ("cmda_offline", "random_teacher_offline"), ("cmda_offline", "shuffled_teacher_offline"))


def compare_methods(per_seed: Mapping[str, Sequence[float]], *, reference: str = "base",
                    teacher_pairs: Sequence[tuple[str, str]] = TEACHER_PAIRS,
                    level: float = 0.95) -> dict[str, dict[str, dict[str, Any]]]:
    """Every method against ``reference`` and every method against its teacher control, paired.

    Args:
        per_seed: ``{method: per-seed results}``, index-aligned across methods (seed ``i``
            of every method shares its data order and initialisation).
        reference: the method every other one is compared with (``name - reference``).
        teacher_pairs: ``(method, control)`` pairs; a pair with a name absent from
            ``per_seed`` is skipped.
        level: confidence level of the intervals.

    Returns:
        ``{"paired": {name: {"vs", "delta", "ci95", "p", "p_holm", "n"}}, "teacher_effect":
        {"method - control": {"method", "control", "delta", "ci95", "p", "p_holm", "n"}}}``.
        ``p_holm`` is Holm's correction over *all* the comparisons returned (both blocks).

    Examples:
        >>> runs = {"base": [0.70, 0.72, 0.71], "cmda": [0.75, 0.76, 0.74],
        ...         "random_teacher": [0.74, 0.76, 0.73]}
        >>> out = compare_methods(runs)
        >>> list(out["paired"]), list(out["teacher_effect"])
        (['cmda', 'random_teacher'], ['cmda - random_teacher'])
        >>> round(out["teacher_effect"]["cmda - random_teacher"]["delta"], 4)
        0.0067
    """
    entries: list[tuple[str, str, dict[str, Any]]] = []
    if reference in per_seed:
        for name in per_seed:
            if name != reference:
                stats = paired_comparison(per_seed[name], per_seed[reference], level=level)
                entries.append(("paired", name, {"vs": reference, **stats}))
    seen = set()
    for method, control in teacher_pairs:
        key = f"{method} - {control}"
        if method in per_seed and control in per_seed and key not in seen:
            seen.add(key)
            stats = paired_comparison(per_seed[method], per_seed[control], level=level)
            entries.append(("teacher_effect", key, {"method": method, "control": control, **stats}))
    out: dict[str, dict[str, dict[str, Any]]] = {"paired": {}, "teacher_effect": {}}
    for (block, key, stats), p_holm in zip(entries, holm([e[2]["p"] for e in entries])):
        n = stats.pop("n")
        out[block][key] = {**stats, "p_holm": p_holm, "n": n}
    return out
