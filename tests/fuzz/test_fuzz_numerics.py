"""Fuzzed numerics: finite output for finite input, convex weights and mixes, inputs untouched.

Extreme values come from ``tests/strategies.py`` (section 4): subnormals, 1e+-38 in float32,
1e+-300 in float64, -0.0. References are independent: float64 numpy for the float32 weights
and labels, an exact ``mpmath`` evaluation for the Gaussian mixture far from its components,
scikit-learn for the mixture near them. The regression tests at the top reproduce the
failures of issue 14 (each failed before the fix).
"""

from __future__ import annotations

import math
import warnings

import mpmath
import numpy as np
import pytest
import strategies as S
import torch
from fuzz_harness import (
    assert_convex_rows,
    assert_in_hull,
    assert_untouched,
    examples,
    expect_cmda_error,
    no_subprocess,
    snapshot,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from cmda_data import ConvergenceWarning, GaussianMixture, ValidationError
from cmda_data.core import functional as Fn
from cmda_data.core import losses

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


# ------------------------------------------------------------------ regressions of issue 14
def test_mix_targets_rows_whose_float32_sum_overflows():
    """Probability rows near 3e38 sum to inf in float32: they were divided by inf (all zero)."""
    targets = torch.tensor([[3e38, 3e38, 0.0], [0.0, 1.0, 3.0]])
    out = Fn.mix_targets(torch.tensor([[0.5, 0.5]]), targets)
    # by hand: 0.5 * [0.5, 0.5, 0] + 0.5 * [0, 0.25, 0.75]
    torch.testing.assert_close(out, torch.tensor([[0.25, 0.375, 0.375]]))
    out = Fn.mix_targets(torch.tensor([[3e38, 3e38]]), targets, index=None)
    torch.testing.assert_close(out, torch.tensor([[0.25, 0.375, 0.375]]))


def test_dca_weights_of_values_near_1e20_are_finite_and_correct():
    inter = torch.tensor([[1e20, 3e20, 1e20], [2e20, 2e20, 0.0]])
    intra = torch.tensor([[1e20, 1e20, 2e20], [1e20, 3e20, 5e20]])
    out = Fn.dca_weights(inter, intra)
    ref = inter.double() * intra.double()  # float64 holds 1e40
    torch.testing.assert_close(out, (ref / ref.sum(1, keepdim=True)).float())
    with pytest.raises(ValidationError, match=r"^intra: expected .*renormalize=False"):
        Fn.dca_weights(inter, intra, renormalize=False)  # 1e40 has no float32


@pytest.mark.parametrize("temperature", [1e-46, 1e-40, 5e-324])
def test_subnormal_temperature_is_refused_by_name(temperature):
    t, s = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValidationError, match=r"^temperature: expected a number >= 1.175e-38"):
        Fn.inter_modal_weights(t, s, temperature=temperature)
    with pytest.raises(ValidationError, match=r"^temperature:"):
        Fn.inter_modal_weights(t.double(), s.double(), temperature=temperature)


def test_smallest_accepted_temperature_gives_the_argmax():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[1.0, 0.1], [0.2, 1.0], [0.9, 0.9]])
    w = Fn.inter_modal_weights(t, s, temperature=torch.finfo(torch.float32).tiny)
    assert torch.equal(w, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


def _exact_resp(gm: GaussianMixture, x) -> list:
    """Responsibilities of one point by exact arithmetic (mpmath, 800 digits) from the float64 parameters."""
    mpmath.mp.dps = 800
    kind, d = gm.covariance_type, gm.means_.shape[1]
    logs = []
    for k in range(gm.n_components):
        if kind == "full":
            P = gm.precisions_[k].tolist()
        elif kind == "tied":
            P = gm.precisions_.tolist()
        else:
            diag = gm.precisions_[k].tolist() if kind == "diag" else [float(gm.precisions_[k])] * d
            P = [[diag[i] if i == j else 0.0 for j in range(d)] for i in range(d)]
        diff = [mpmath.mpf(x[i]) - mpmath.mpf(float(gm.means_[k, i])) for i in range(d)]
        maha = sum(diff[i] * P[i][j] * diff[j] for i in range(d) for j in range(d))
        logs.append(mpmath.log(float(gm.weights_[k])) + mpmath.log(mpmath.det(mpmath.matrix(P))) / 2 - maha / 2)
    top = max(logs)
    total = top + mpmath.log(sum(mpmath.exp(v - top) for v in logs))
    return [float(mpmath.exp(v - total)) for v in logs]


@pytest.fixture(scope="module")
def blobs():
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(40, 3, generator=g, dtype=torch.float64) * 0.5,
                      torch.randn(40, 3, generator=g, dtype=torch.float64) * 2 + 4])


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_predict_proba_at_1e200_is_finite_and_exact(blobs, kind):
    """Points at 1e200 gave NaN (overflowed squares); now the exact limit (checked with 800 digits)."""
    gm = GaussianMixture(2, covariance_type=kind, random_state=0).fit(blobs)
    g = torch.Generator().manual_seed(1)
    for scale in (1e150, 1e200, 1e300):
        X = torch.randn(4, 3, generator=g, dtype=torch.float64) * scale
        proba = gm.predict_proba(X)
        assert_convex_rows(proba, atol=1e-12)
        for i in range(X.shape[0]):
            assert proba[i].tolist() == pytest.approx(_exact_resp(gm, X[i].tolist()), abs=1e-9)
        assert not bool(torch.isnan(gm.score_samples(X)).any())  # -inf only below the float64 range


def test_fit_warns_when_kmeans_finds_fewer_clusters_like_sklearn():
    X = np.array([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        SkGaussianMixture(3, random_state=0).fit(X)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        GaussianMixture(3, random_state=0).fit(torch.from_numpy(X))
    expected = [str(w.message) for w in theirs if "distinct clusters" in str(w.message)]
    got = [str(w.message) for w in ours if issubclass(w.category, ConvergenceWarning)
           and "distinct clusters" in str(w.message)]
    assert expected and got == expected[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # three distinct points: no warning
        GaussianMixture(3, random_state=0, max_iter=500).fit(torch.tensor([[0.0], [0.0], [5.0], [9.0]]))


# ------------------------------------------------------------------ properties
@settings(max_examples=examples())
@given(st.data(), st.sampled_from([torch.float32, torch.float64]), st.sampled_from(Fn.SIMILARITIES),
       st.one_of(st.none(), st.sampled_from([1.2e-38, 1e-30, 1e-3, 0.5, 1e30])),
       st.one_of(st.none(), st.sampled_from([0.0, 1.0, 1e30])))
def test_inter_modal_weights_are_convex_for_extreme_latents(data, dtype, similarity, temperature, self_weight):
    """Eq. 10 of latents with subnormal and huge entries: convex rows, inputs untouched."""
    n, m, d = data.draw(S.batch_sizes(5)), data.draw(S.batch_sizes(5)), data.draw(st.integers(1, 4))
    teacher = data.draw(S.extreme_tensors((n, d), dtype))
    student = data.draw(S.extreme_tensors((m, d), dtype))
    if self_weight is not None:
        student = student[:n] if m >= n else torch.cat([student, teacher[: n - m]])
    saved = snapshot(teacher, student)
    with no_subprocess():
        w = Fn.inter_modal_weights(teacher, student, similarity=similarity, temperature=temperature,
                                   self_weight=self_weight)
    assert_untouched(saved)
    assert w.dtype == dtype
    assert_convex_rows(w)


@settings(max_examples=examples())
@given(st.data(), st.sampled_from([torch.float32, torch.float64]), st.booleans(), st.booleans(),
       st.one_of(st.none(), st.integers(1, 6)))
def test_dca_weights_match_a_float64_reference_for_extreme_values(data, dtype, with_intra, exclude_self, top_k):
    """inter x intra up to 3e38 (float32) / 1e308 (float64): convex rows equal to the exact product's."""
    n = data.draw(S.batch_sizes(6))
    m = n if exclude_self else data.draw(S.batch_sizes(6))
    inter = data.draw(S.extreme_tensors((n, m), dtype, nonnegative=True))
    intra = data.draw(S.extreme_tensors((n, m), dtype, nonnegative=True)) if with_intra else None
    saved = snapshot(inter, intra)
    w = Fn.dca_weights(inter, intra, top_k=top_k, exclude_self=exclude_self)
    assert_untouched(saved)
    assert_convex_rows(w)
    if dtype == torch.float32 and top_k is None and not exclude_self:
        # reference: the product in float64 (exact for float32 factors), scaled by the row max
        ref = inter.double() * (intra.double() if intra is not None else 1.0)
        top = ref.amax(1, keepdim=True)
        ref = torch.where(top > 0, ref / top.clamp_min(1e-300), torch.ones_like(ref))
        ref = ref / ref.sum(1, keepdim=True)
        torch.testing.assert_close(w.double(), ref, atol=1e-6, rtol=1e-5)


@settings(max_examples=examples())
@given(st.data(), st.sampled_from([torch.float32, torch.float64]))
def test_dca_weights_without_renormalize_are_finite_or_refused(data, dtype):
    """renormalize=False keeps the raw product: finite, or a ValidationError naming intra."""
    n, m = data.draw(S.batch_sizes(5)), data.draw(S.batch_sizes(5))
    inter = data.draw(S.extreme_tensors((n, m), dtype, nonnegative=True))
    intra = data.draw(S.extreme_tensors((n, m), dtype, nonnegative=True))
    ok, w = expect_cmda_error(lambda: Fn.dca_weights(inter, intra, renormalize=False), ["intra"])
    exact = inter.double() * intra.double()
    if ok:
        assert bool(torch.isfinite(w).all())
    else:
        assert not bool(torch.isfinite(exact.to(dtype)).all())  # refused only when it truly overflows


@settings(max_examples=examples())
@given(st.data(), st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       st.booleans())
def test_mix_is_convex_and_finite_for_extreme_samples(data, dtype, sparse):
    """Convex weights over samples with subnormal / 3e38 / 1e300 entries: each output in its partners' hull."""
    m, n = data.draw(S.batch_sizes(6)), data.draw(S.batch_sizes(6))
    shape = data.draw(S.trailing_shapes())
    samples = data.draw(S.extreme_tensors((m, *shape), torch.float64 if dtype == torch.float64 else
                                          torch.float32)).to(dtype)
    samples = torch.nan_to_num(samples, posinf=torch.finfo(dtype).max, neginf=-torch.finfo(dtype).max)
    if sparse:
        k = data.draw(st.integers(1, m + 1))
        index = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, m - 1), min_size=k, max_size=k),
                                                min_size=n, max_size=n)))
        weights = data.draw(S.stochastic_rows(n, k))
    else:
        index, weights = None, data.draw(S.stochastic_rows(n, m))
    saved = snapshot(samples, weights, index)
    out = Fn.mix(weights, samples, index=index)
    assert_untouched(saved)
    assert out.dtype == dtype and out.shape == (n, *shape)
    assert_in_hull(out, samples, index=index, weights=weights,
                   rel=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4)


@settings(max_examples=examples())
@given(st.data(), st.booleans(), st.sampled_from([0.0, 0.1]))
def test_mix_targets_match_a_float64_reference(data, class_indices, smoothing):
    """Soft labels of extreme weights and targets (near 3e38, subnormal): rows sum to 1, equal to float64."""
    n, m, c = data.draw(S.batch_sizes(5)), data.draw(S.batch_sizes(5)), data.draw(st.integers(1, 5))
    weights = data.draw(S.extreme_tensors((n, m), torch.float32, nonnegative=True))
    weights[weights.sum(1) == 0, 0] = 1.0
    if class_indices:
        targets = torch.tensor(data.draw(st.lists(st.integers(0, c - 1), min_size=m, max_size=m)))
        probs = torch.nn.functional.one_hot(targets, c).double()
    else:
        targets = data.draw(S.extreme_tensors((m, c), torch.float32, nonnegative=True))
        targets[targets.sum(1) == 0, 0] = 1.0
        probs = targets.double() / targets.double().sum(1, keepdim=True)
    saved = snapshot(weights, targets)
    out = Fn.mix_targets(weights, targets, num_classes=c if class_indices else None, label_smoothing=smoothing)
    assert_untouched(saved)
    assert_convex_rows(out)
    w = weights.double() / weights.double().sum(1, keepdim=True)
    ref = w @ (probs * (1 - smoothing) + smoothing / c)
    torch.testing.assert_close(out.double(), ref / ref.sum(1, keepdim=True), atol=1e-5, rtol=1e-4)


@settings(max_examples=examples())
@given(st.data())
def test_topk_sparse_rows_are_convex_for_extreme_weights(data):
    """topk_sparse of subnormal / huge weights: k convex values per row, the k largest."""
    n, m = data.draw(S.batch_sizes(5)), data.draw(S.batch_sizes(6))
    weights = data.draw(S.extreme_tensors((n, m), nonnegative=True))
    k = data.draw(st.integers(1, m + 2))
    index, values = Fn.topk_sparse(weights, k)
    assert_convex_rows(values)
    assert index.shape == (n, min(k, m))


@settings(max_examples=examples())
@given(st.data())
def test_intra_modal_weights_are_bounded_for_subnormal_responsibilities(data):
    """Eq. 11 of responsibilities with subnormal entries: soft in [0, 2], hard in {0, 1}."""
    n, c = data.draw(S.batch_sizes(5)), data.draw(st.integers(1, 4))
    raw = data.draw(S.extreme_tensors((n, c), torch.float64, nonnegative=True))
    raw[raw.sum(1) == 0, 0] = 1.0
    resp = raw / raw.amax(1, keepdim=True)
    resp = resp / resp.sum(1, keepdim=True)
    soft = Fn.intra_modal_weights(resp)
    hard = Fn.intra_modal_weights(resp, mode="hard")
    assert bool(torch.isfinite(soft).all()) and bool(((soft >= 0) & (soft <= 2 + 1e-12)).all())
    assert set(hard.unique().tolist()) <= {0.0, 1.0}


@settings(max_examples=examples(0.25))
@given(st.data(), st.sampled_from(COVARIANCE_TYPES), st.sampled_from([1.0, 1e3, 1e50, 1e150, 1e200, 1e300]))
def test_predict_proba_is_finite_everywhere_and_sklearn_near_the_data(blobs, data, kind, scale):
    """Points from 1 to 1e300 (and -0.0, subnormals): convex responsibilities; scikit-learn's near the data."""
    gm = _fitted(kind)
    X = data.draw(S.extreme_tensors((data.draw(st.integers(1, 6)), 3), torch.float64, same_scale=False))
    X = torch.where(X.abs() > scale, X.sign() * scale, X)
    saved = snapshot(X)
    proba = gm.predict_proba(X)
    assert_untouched(saved)
    assert_convex_rows(proba, atol=1e-9)
    assert not bool(torch.isnan(gm.score_samples(X)).any())
    near = X.abs().amax(1) <= 50
    if bool(near.any()):
        sk = _sklearn_twin(gm)
        np.testing.assert_allclose(proba[near].numpy(), sk.predict_proba(X[near].numpy()), atol=1e-8)


_FITTED: dict = {}


def _fitted(kind: str) -> GaussianMixture:
    if kind not in _FITTED:
        g = torch.Generator().manual_seed(0)
        X = torch.cat([torch.randn(40, 3, generator=g, dtype=torch.float64) * 0.5,
                       torch.randn(40, 3, generator=g, dtype=torch.float64) * 2 + 4])
        _FITTED[kind] = GaussianMixture(2, covariance_type=kind, random_state=0).fit(X)
    return _FITTED[kind]


def _sklearn_twin(gm: GaussianMixture) -> SkGaussianMixture:
    """A scikit-learn mixture holding our fitted parameters (the oracle of the E-step)."""
    sk = SkGaussianMixture(gm.n_components, covariance_type=gm.covariance_type)
    sk.weights_, sk.means_ = gm.weights_.numpy(), gm.means_.numpy()
    sk.covariances_, sk.precisions_cholesky_ = gm.covariances_.numpy(), gm.precisions_cholesky_.numpy()
    sk.precisions_ = gm.precisions_.numpy()
    return sk


@settings(max_examples=examples(0.1))
@given(st.data(), st.sampled_from(COVARIANCE_TYPES), st.integers(1, 3))
def test_gaussian_mixture_fit_on_extreme_data_is_finite_or_refused(data, kind, n_components):
    """fit on data with subnormal to 1e300 entries: finite parameters, or a CMDAError naming the argument."""
    X = data.draw(S.extreme_tensors((data.draw(st.integers(n_components, 12)), 2), torch.float64))
    saved = snapshot(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ok, gm = expect_cmda_error(lambda: GaussianMixture(n_components, covariance_type=kind, random_state=0,
                                                           max_iter=20).fit(X), ["X", "reg_covar"])
    assert_untouched(saved)
    if ok:
        for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
            assert bool(torch.isfinite(getattr(gm, name)).all()), name
        assert_convex_rows(gm.predict_proba(X), atol=1e-9)


@settings(max_examples=examples(0.5))
@given(st.data(), st.sampled_from(["eq7", "eq8", "supcon"]), st.sampled_from([1e-3, 0.07, 0.5]))
def test_losses_are_finite_for_extreme_latents(data, which, tau):
    """Eq. 7 / 8 / SupCon of latents with subnormal and huge entries: a finite loss."""
    m, d = data.draw(st.integers(2, 5)), data.draw(st.integers(1, 4))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    z = [data.draw(S.extreme_tensors((m, d), dtype)) for _ in range(2)]
    labels = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=m, max_size=m)))
    saved = snapshot(z, labels)
    if which == "eq7":
        loss = losses.eq7_loss(z, tau=tau)
    elif which == "eq8":
        loss = losses.eq8_loss(z, labels, tau=tau)
    else:
        loss = losses.supcon_loss(z, labels, tau=tau)
    assert_untouched(saved)
    assert bool(torch.isfinite(loss).all()), float(loss)
    assert math.isfinite(float(loss))
