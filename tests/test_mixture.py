"""GaussianMixture against scikit-learn (the oracle) and scipy densities; select_n_components."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import CPU_AND_CUDA, require_data
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from cmda_data.core import _em
from cmda_data.core.mixture import GaussianMixture, select_n_components
from cmda_data.exceptions import CMDAError, ConvergenceWarning, NotFittedError, ShapeError, ValidationError

KINDS = ["full", "tied", "diag", "spherical"]
F64 = dict(rtol=1e-6, atol=1e-9)
FITTED = ["weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"]


def blobs(n_per=(120, 90, 60), d=3, seed=0, spread=6.0):
    """Anisotropic Gaussian blobs with random full covariances (numpy float64)."""
    rng = np.random.default_rng(seed)
    parts = []
    for size in n_per:
        factor = rng.normal(size=(d, d)) * 0.6 + np.eye(d)
        parts.append(rng.normal(size=(size, d)) @ factor + rng.normal(0.0, spread, d))
    return np.concatenate(parts)


def sklearn_init(X, m, kind, seed=0):
    """weights, means, precisions after one sklearn EM step: a valid shared start for both."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkGaussianMixture(m, covariance_type=kind, max_iter=1, random_state=seed).fit(X)
    return dict(weights_init=sk.weights_, means_init=sk.means_, precisions_init=sk.precisions_)


def fit_both(X, m, kind, **options):
    options = {"covariance_type": kind, **sklearn_init(X, m, kind), **options}
    sk = SkGaussianMixture(m, **options).fit(X)
    ours = GaussianMixture(m, **options).fit(X)
    return ours, sk


def assert_close(actual, expected, **tol):
    if isinstance(actual, torch.Tensor):
        actual = actual.cpu().numpy()
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected), **(tol or F64))


def full_covariances(model):
    """``[M, d, d]`` covariance matrices whatever the covariance_type."""
    cov, (m, d) = model.covariances_.numpy(), model.means_.shape
    return {"full": lambda: cov, "tied": lambda: np.broadcast_to(cov, (m, d, d)),
            "diag": lambda: np.stack([np.diag(c) for c in cov]),
            "spherical": lambda: np.stack([c * np.eye(d) for c in cov])}[model.covariance_type]()


# ----------------------------------------------------------------------------- sklearn parity


@pytest.mark.parametrize("kind", KINDS)
def test_matches_sklearn_with_same_init(kind):
    X = blobs()
    ours, sk = fit_both(X, 3, kind, tol=1e-6)
    for name in FITTED:
        assert getattr(ours, name).dtype == torch.float64
        assert_close(getattr(ours, name), getattr(sk, name))
    assert ours.n_iter_ == sk.n_iter_ and ours.converged_ == sk.converged_ is True
    assert ours.lower_bound_ == pytest.approx(sk.lower_bound_, rel=1e-9)
    assert_close(ours.lower_bounds_, sk.lower_bounds_, rtol=1e-9)
    assert ours.score(X) == pytest.approx(sk.score(X), rel=1e-9)
    assert ours.bic(X) == pytest.approx(sk.bic(X), rel=1e-9)
    assert ours.aic(X) == pytest.approx(sk.aic(X), rel=1e-9)
    assert ours._n_parameters() == sk._n_parameters()
    proba = ours.predict_proba(X)
    assert_close(proba.sum(1), np.ones(len(X)), rtol=1e-12)
    assert_close(proba, sk.predict_proba(X), rtol=1e-6, atol=1e-9)
    assert torch.equal(ours.predict(X), torch.from_numpy(sk.predict(X)))
    assert_close(ours.score_samples(X), sk.score_samples(X))


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_iterations_match_sklearn(kind):
    X = blobs(seed=3)
    options = dict(covariance_type=kind, max_iter=7, tol=0.0, **sklearn_init(X, 3, kind, seed=1))
    with pytest.warns(ConvergenceWarning):
        ours = GaussianMixture(3, **options).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkGaussianMixture(3, **options).fit(X)
    assert ours.n_iter_ == 7 and not ours.converged_
    for name in FITTED:
        assert_close(getattr(ours, name), getattr(sk, name))
    assert_close(ours.lower_bounds_, sk.lower_bounds_, rtol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_partial_init_overrides_only_what_is_given(kind):
    X = blobs(seed=3)
    init = sklearn_init(X, 3, kind)
    start = GaussianMixture(3, covariance_type=kind, max_iter=0, random_state=0).fit(X)
    means_only = GaussianMixture(3, covariance_type=kind, max_iter=0, random_state=0,
                                 means_init=init["means_init"]).fit(X)
    assert_close(means_only.means_, init["means_init"], rtol=1e-14, atol=1e-14)
    assert torch.equal(means_only.weights_, start.weights_)  # the rest comes from init_params
    assert torch.equal(means_only.covariances_, start.covariances_)
    prec_only = GaussianMixture(3, covariance_type=kind, max_iter=0, random_state=0,
                                precisions_init=init["precisions_init"]).fit(X)
    assert_close(prec_only.precisions_, init["precisions_init"], rtol=1e-10)
    assert torch.equal(prec_only.means_, start.means_)


@pytest.mark.parametrize("kind", KINDS)
def test_score_samples_equals_scipy_mixture_density(kind):
    X = blobs(seed=1)
    model = GaussianMixture(3, covariance_type=kind, random_state=0).fit(X)
    weights, means, covs = model.weights_.numpy(), model.means_.numpy(), full_covariances(model)
    queries = np.concatenate([X[:20], X[:5] + 3.0])
    expected = logsumexp(np.stack([np.log(w) + multivariate_normal(mu, c).logpdf(queries)
                                   for w, mu, c in zip(weights, means, covs)], 1), axis=1)
    assert_close(model.score_samples(queries), expected, rtol=1e-9)
    assert model.score(queries) == pytest.approx(expected.mean(), rel=1e-9)


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_real_wikipedia_minilm_embeddings_match_sklearn(kind):
    emb = np.load(require_data("wikipedia", "derived_minilm_l6_text_emb.npy")).astype(np.float64)
    centered = emb - emb.mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    X = centered @ vt[:32].T  # PCA-32
    ours, sk = fit_both(X, 4, kind)
    assert ours.converged_ and sk.converged_
    for name in FITTED:
        assert_close(getattr(ours, name), getattr(sk, name), rtol=1e-6, atol=1e-9)
    assert ours.n_iter_ == sk.n_iter_
    assert ours.lower_bound_ == pytest.approx(sk.lower_bound_, rel=1e-9)
    assert ours.bic(X) == pytest.approx(sk.bic(X), rel=1e-9)
    assert_close(ours.predict_proba(X), sk.predict_proba(X), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- EM properties


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_em_never_lowers_the_lower_bound(kind, init_params):
    X = blobs(seed=2, spread=2.0)
    model = GaussianMixture(3, covariance_type=kind, init_params=init_params, random_state=5, tol=1e-8,
                            max_iter=300).fit(X)
    bounds = np.asarray(model.lower_bounds_)
    assert np.isfinite(bounds).all() and len(bounds) == model.n_iter_
    assert (np.diff(bounds) >= -1e-10).all()
    # the same with warm starts of one step each
    stepper = GaussianMixture(3, covariance_type=kind, init_params=init_params, random_state=5, max_iter=1,
                              warm_start=True)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(15):
            seen.append(stepper.fit(X).lower_bound_)
    assert (np.diff(seen) >= -1e-10).all()
    steps = min(15, len(bounds))
    assert_close(seen[:steps], bounds[:steps], rtol=1e-9)  # warm starts continue the same EM path


def test_warm_start_continues_and_ignores_n_init():
    X = blobs(seed=4)
    model = GaussianMixture(3, max_iter=2, tol=0.0, warm_start=True, n_init=5, random_state=0)
    with pytest.warns(ConvergenceWarning):
        model.fit(X)
    first = model.lower_bound_
    with pytest.warns(ConvergenceWarning):
        model.fit(X)
    assert model.lower_bounds_[0] >= first - 1e-12 and model.n_iter_ == 2


def test_n_init_keeps_the_best_lower_bound():
    X = blobs(seed=6, spread=2.0)
    single = GaussianMixture(4, init_params="random", random_state=3).fit(X)
    best = GaussianMixture(4, init_params="random", random_state=3, n_init=4).fit(X)
    assert best.lower_bound_ >= single.lower_bound_ - 1e-12


def test_convergence_warning_with_max_iter_1():
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        model = GaussianMixture(2, max_iter=1, random_state=0).fit(blobs())
    assert not model.converged_ and model.n_iter_ == 1


def test_max_iter_0_keeps_kmeans_plusplus_and_random_from_data_starts():
    X = blobs(seed=7)
    for init in ("k-means++", "random_from_data"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # max_iter=0 never warns
            model = GaussianMixture(3, init_params=init, max_iter=0, reg_covar=1e-3, random_state=0).fit(X)
        rows = torch.from_numpy(X)
        nearest = (model.means_[:, None, :] - rows[None]).abs().amax(-1).min(1).values
        assert (nearest < 1e-12).all()  # means are data points (up to the 10 * eps size guard)
        assert_close(model.covariances_, np.broadcast_to(1e-3 * np.eye(3), (3, 3, 3)), rtol=1e-9, atol=1e-12)
        assert model.n_iter_ == 0 and model.lower_bound_ == -np.inf


def test_kmeans_init_recovers_separated_blobs():
    X = blobs(n_per=(50, 70, 40), spread=25.0, seed=8)
    truth = np.repeat([0, 1, 2], [50, 70, 40])
    labels = GaussianMixture(3, random_state=0).fit_predict(X).numpy()
    assert len({(a, b) for a, b in zip(truth, labels)}) == 3  # a one-to-one relabelling


@pytest.mark.parametrize("kind", KINDS)
def test_degenerate_data_gives_finite_results(kind):
    rng = np.random.default_rng(0)
    duplicates = np.repeat(rng.normal(size=(3, 4)), 20, axis=0)
    constant_feature = np.concatenate([rng.normal(size=(40, 3)), np.full((40, 1), 7.0)], 1)
    few = rng.normal(size=(4, 4))  # n == M
    identical = np.ones((10, 4)) * 1e3
    for X, m in ((duplicates, 3), (duplicates, 5), (constant_feature, 3), (few, 4), (identical, 2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = GaussianMixture(m, covariance_type=kind, random_state=0).fit(X)
        for name in FITTED:
            assert torch.isfinite(getattr(model, name)).all(), (name, X.shape, m)
        assert np.isfinite(model.lower_bound_) and np.isfinite(model.bic(X))
        assert torch.isfinite(model.predict_proba(X)).all() and torch.isfinite(model.score_samples(X)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_singular_covariance_without_reg_covar_raises_clear_error(kind):
    X = np.ones((10, 3))
    with pytest.raises(ValidationError, match=r"reg_covar: expected a value large enough .* fewer components"):
        GaussianMixture(1, covariance_type=kind, reg_covar=0.0).fit(X)


def test_float32_input_matches_float64():
    X = blobs(seed=9)
    init = sklearn_init(X, 3, "full")
    m64 = GaussianMixture(3, **init).fit(torch.from_numpy(X))
    X32 = torch.from_numpy(X).float()
    m32 = GaussianMixture(3, **init).fit(X32)
    assert m32.means_.dtype == torch.float64
    assert m32.predict_proba(X32).dtype == torch.float32 and m32.score_samples(X32).dtype == torch.float32
    for name in FITTED:
        assert_close(getattr(m32, name), getattr(m64, name).numpy(), rtol=1e-4, atol=1e-5)
    assert_close(m32.score_samples(X32), m64.score_samples(X).numpy(), rtol=1e-5)
    assert m32.predict_proba(torch.ones(2, 3, dtype=torch.int64)).dtype == torch.float64


def test_numpy_input_gives_tensors_and_inputs_are_not_modified():
    X = blobs()
    keep = X.copy()
    tensor = torch.from_numpy(X.copy())
    model = GaussianMixture(3, random_state=0).fit(X)
    GaussianMixture(3, random_state=0).fit(tensor)
    assert np.array_equal(X, keep) and np.array_equal(tensor.numpy(), keep)
    assert isinstance(model.predict(X), torch.Tensor) and isinstance(model.means_, torch.Tensor)


# ----------------------------------------------------------------------------- random state, sample


def test_random_state_semantics_and_no_global_rng():
    X = blobs(seed=10, spread=1.0)
    state = torch.get_rng_state()
    a = GaussianMixture(3, init_params="random", random_state=4).fit(X)
    b = GaussianMixture(3, init_params="random", random_state=4).fit(X)
    GaussianMixture(3, init_params="random").fit(X)  # None: OS entropy, not torch's global RNG
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.means_, b.means_)
    generator = torch.Generator().manual_seed(4)
    c = GaussianMixture(3, init_params="random", random_state=generator).fit(X)
    assert torch.equal(c.means_, a.means_)  # same seed, same stream
    assert not torch.equal(generator.get_state(), torch.Generator().manual_seed(4).get_state())
    # generator= is the torch spelling of random_state=<Generator>: the same stream, advanced
    d = GaussianMixture(3, init_params="random", generator=torch.Generator().manual_seed(4)).fit(X)
    assert torch.equal(d.means_, a.means_)
    g = torch.Generator().manual_seed(5)
    model = GaussianMixture(3, init_params="random", generator=g).fit(X)
    first, _ = model.sample(4)
    second, _ = model.sample(4)
    assert not torch.equal(first, second)  # the one generator advances


@pytest.mark.parametrize("kind", KINDS)
def test_sample_shapes_and_component_means(kind):
    X = blobs(spread=10.0)
    model = GaussianMixture(3, covariance_type=kind, random_state=0).fit(X)
    samples, labels = model.sample(6000)
    assert samples.shape == (6000, 3) and samples.dtype == torch.float64 and labels.dtype == torch.int64
    assert torch.equal(labels, labels.sort().values)  # grouped by component, as scikit-learn
    counts = torch.bincount(labels, minlength=3).double() / 6000
    assert_close(counts, model.weights_.numpy(), atol=0.03)
    covs = full_covariances(model)
    for k in range(3):
        part = samples[labels == k].numpy()
        tolerance = 5 * np.sqrt(np.diag(covs[k]) / len(part))
        assert (np.abs(part.mean(0) - model.means_[k].numpy()) < tolerance).all()
        assert_close(np.cov(part.T), covs[k], rtol=0.2, atol=0.2 * np.abs(covs[k]).max())
    again, _ = model.sample(6000)
    assert torch.equal(again, samples)  # an int random_state gives the same draw
    assert model.sample()[0].shape == (1, 3)


# ----------------------------------------------------------------------------- select_n_components


@pytest.mark.parametrize("criterion", ["bic", "aic"])
def test_select_n_components_finds_true_m_and_uses_sklearn_bic(criterion):
    X = blobs(n_per=(80, 80, 80), d=2, spread=30.0, seed=11)
    best, scores = select_n_components(X, range(1, 6), criterion=criterion, random_state=0)
    assert best == 3 and sorted(scores) == [1, 2, 3, 4, 5]
    for m in (2, 3):
        ours = GaussianMixture(m, random_state=0).fit(X)  # the same fit as inside select_n_components
        sk = SkGaussianMixture(m)
        for name in FITTED:
            setattr(sk, name, getattr(ours, name).numpy())
        sk.n_features_in_ = 2
        expected = sk.bic(X) if criterion == "bic" else sk.aic(X)
        assert scores[m] == pytest.approx(expected, rel=1e-10)


def test_select_n_components_bad_arguments():
    X = blobs()
    with pytest.raises(ValidationError, match=r"criterion: expected one of 'bic', 'aic', got 'nll'"):
        select_n_components(X, criterion="nll")
    with pytest.raises(ValidationError, match=r"candidates: expected component counts <= n_samples = 270, got 300"):
        select_n_components(X, [2, 300])
    with pytest.raises(ValidationError, match=r"candidates: expected an integer >= 1, got 0"):
        select_n_components(X, [0, 2])
    with pytest.raises(ValidationError, match=r"candidates: expected at least one component count"):
        select_n_components(X, [])
    with pytest.raises(ValidationError, match=r"gmm_kwargs: expected no 'n_components'"):
        select_n_components(X, [1], n_components=2)


# ----------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("kind", KINDS)
def test_device_is_kept_and_matches_cpu(device, kind):
    X = blobs(seed=12)
    init = sklearn_init(X, 3, kind)
    data = torch.from_numpy(X).float().to(device)
    model = GaussianMixture(3, covariance_type=kind, **init).fit(data)
    reference = GaussianMixture(3, covariance_type=kind, **init).fit(torch.from_numpy(X).float())
    for name in FITTED:
        value = getattr(model, name)
        assert value.device.type == device and value.dtype == torch.float64
        assert_close(value, getattr(reference, name).numpy(), rtol=1e-6, atol=1e-8)
    proba, labels = model.predict_proba(data), model.predict(data)
    assert proba.device.type == device and proba.dtype == torch.float32 and labels.device.type == device
    assert model.score_samples(data).device.type == device
    samples, sample_labels = model.sample(10)
    assert samples.device.type == device and sample_labels.device.type == device
    assert model.predict(data.cpu()).device.type == "cpu"  # results follow the device of X


# ----------------------------------------------------------------------------- errors


def test_not_fitted_error_is_value_and_attribute_error():
    model = GaussianMixture(2)
    for call in (lambda: model.predict(np.ones((2, 2))), lambda: model.predict_proba(np.ones((2, 2))),
                 lambda: model.score_samples(np.ones((2, 2))), lambda: model.score(np.ones((2, 2))),
                 lambda: model.sample(2), lambda: model.bic(np.ones((2, 2))), model._n_parameters):
        with pytest.raises(NotFittedError, match=r"GaussianMixture: expected a fitted model \(call fit\(X\) first\)"):
            call()
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    with pytest.raises(AttributeError):
        model.predict(np.ones((2, 2)))


@pytest.mark.parametrize("options, message", [
    (dict(n_components=0), r"n_components: expected an integer >= 1, got 0"),
    (dict(n_components=1.5), r"n_components: expected an integer >= 1, got 1.5"),
    (dict(covariance_type="full_"), r"covariance_type: expected one of 'full', 'tied', 'diag', 'spherical', got"),
    (dict(tol=-1.0), r"tol: expected a finite number >= 0, got -1.0"),
    (dict(reg_covar=float("nan")), r"reg_covar: expected a finite number >= 0, got nan"),
    (dict(max_iter=-1), r"max_iter: expected an integer >= 0, got -1"),
    (dict(n_init=0), r"n_init: expected an integer >= 1, got 0"),
    (dict(init_params="kmeans+"), r"init_params: expected one of 'kmeans', 'k-means\+\+', 'random', 'random_from_data'"),
    (dict(random_state=-3), r"random_state: expected None, an integer in \[0, 2\*\*63\) or a torch.Generator, got -3"),
    (dict(random_state="0"), r"random_state: expected None, an integer"),
    (dict(generator=4), r"generator: expected None or a torch.Generator, got 4"),
    (dict(generator=torch.Generator(), random_state=0),
     r"generator: expected a generator or a random_state, not both, got generator and random_state=0"),
    (dict(warm_start=1), r"warm_start: expected a bool, got 1"),
    (dict(verbose=-1), r"verbose: expected an integer >= 0, got -1"),
    (dict(verbose_interval=0), r"verbose_interval: expected an integer >= 1, got 0"),
])
def test_bad_options_raise_in_init(options, message):
    with pytest.raises(ValidationError, match=message):
        GaussianMixture(**options)


def test_bad_data_raises():
    model = GaussianMixture(3)
    cases = [
        (np.ones(5), ShapeError, r"X: expected a 2-D tensor, got tensor of shape \(5,\)"),
        ([[1.0, 2.0]], ValidationError, r"X: expected a torch.Tensor or numpy array of shape \[n_samples, n_features\], got"),
        (np.array([["a", "b"]]), ValidationError, r"X: expected a real-valued array"),
        (torch.ones(2, 2, dtype=torch.complex64), ValidationError, r"X: expected a real-valued tensor"),
        (np.zeros((0, 3)), ShapeError, r"X: expected at least one sample and one feature"),
        (np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 2.0]]), ValidationError,
         r"X: expected finite values \(no NaN or inf\), got 1 non-finite entries"),
        (np.ones((2, 3)), ShapeError, r"X: expected n_samples >= n_components = 3, got 2 samples"),
    ]
    for X, error, message in cases:
        with pytest.raises(error, match=message):
            model.fit(X)
    fitted = GaussianMixture(2, random_state=0).fit(blobs())
    with pytest.raises(ShapeError, match=r"X: expected 3 features \(as seen in fit\), got 4 features"):
        fitted.predict(np.ones((2, 4)))
    with pytest.raises(ValidationError, match=r"X: expected finite values"):
        fitted.score_samples(np.array([[np.inf, 0.0, 0.0]]))
    with pytest.raises(ValidationError, match=r"n_samples: expected an integer >= 1, got 0"):
        fitted.sample(0)
    warm = GaussianMixture(2, warm_start=True, random_state=0).fit(blobs())
    with pytest.raises(ShapeError, match=r"X: expected 3 features for warm_start"):
        warm.fit(np.ones((10, 2)))


@pytest.mark.parametrize("kind", KINDS)
def test_bad_init_arrays_raise(kind):
    X = blobs()
    good = sklearn_init(X, 3, kind)
    bad_precision = {"full": -np.broadcast_to(np.eye(3), (3, 3, 3)), "tied": -np.eye(3),
                     "diag": -np.ones((3, 3)), "spherical": -np.ones(3)}[kind]
    expected_precision = (r"precisions_init: expected symmetric positive-definite matrices, got a matrix that is not "
                          r"positive definite" if kind in ("full", "tied")
                          else r"precisions_init: expected positive values, got minimum -1")
    cases = [
        (dict(weights_init=np.ones(2) / 2), ShapeError, r"weights_init: expected shape \(3,\) = \(n_components,\)"),
        (dict(weights_init=np.array([0.5, 0.4, 0.3])), ValidationError,
         r"weights_init: expected weights in \[0, 1\] that sum to 1, got min 0.3, max 0.5, sum 1.2"),
        (dict(weights_init=np.array([0.5, np.nan, 0.5])), ValidationError, r"weights_init: expected finite values"),
        (dict(means_init=np.zeros((3, 4))), ShapeError,
         r"means_init: expected shape \(3, 3\) = \(n_components, n_features\)"),
        (dict(means_init="abc"), ValidationError, r"means_init: expected an array of real numbers"),
        (dict(precisions_init=np.ones((5,))), ShapeError, r"precisions_init: expected shape \(.*\) = \(.*\) for "
                                                          rf"covariance_type='{kind}'"),
        (dict(precisions_init=bad_precision), ValidationError, expected_precision),
    ]
    if kind in ("full", "tied"):
        asym = np.array(good["precisions_init"], copy=True)
        asym[..., 0, 1] += 1.0
        cases.append((dict(precisions_init=asym), ValidationError, r"got a matrix that is not symmetric"))
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            GaussianMixture(3, covariance_type=kind, **options).fit(X)
    assert issubclass(ShapeError, CMDAError)


def test_kmeans_helpers_are_deterministic_with_a_generator():
    X = torch.from_numpy(blobs(spread=20.0))
    a = _em.kmeans(X, 3, torch.Generator().manual_seed(1))[0]
    b = _em.kmeans(X, 3, torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, b) and len(torch.unique(a)) == 3
    centers, index = _em.kmeans_plusplus(X, 3, torch.Generator().manual_seed(2))
    assert torch.equal(centers, X[index]) and len(set(index.tolist())) == 3
