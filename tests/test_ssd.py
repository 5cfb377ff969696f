"""SSD evaluation (benchmarks/ssd.py) against a hand computation with numpy / scipy / sklearn."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from sklearn.metrics import average_precision_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ssd  # noqa: E402


def _reference_scores(train, test):
    # step by step: L2 rows, z-score with train stats, MLE covariance, pinv, squared distance
    def l2(a):
        return a / (np.sqrt((a ** 2).sum(1, keepdims=True)) + 1e-10)

    tr, te = l2(train), l2(test)
    mu, sd = tr.mean(0), tr.std(0)
    tr, te = (tr - mu) / (sd + 1e-10), (te - mu) / (sd + 1e-10)
    center = tr.mean(0)
    cov = (tr - center).T @ (tr - center) / len(tr)
    vi = np.linalg.pinv(cov)
    return np.array([mahalanobis(x, center, vi) ** 2 for x in te])


def test_scores_match_scipy_mahalanobis():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(40, 5)) + 3, rng.normal(size=(12, 5)) + 3
    np.testing.assert_allclose(ssd.ssd_scores(train, test), _reference_scores(train, test), rtol=1e-8)


def test_tiny_hand_example():
    # after L2 + z-score the 2-D train set is the four points (+-1, +-1)-like corners; a point far
    # along the first axis gets a larger distance than the train mean direction
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    test = np.array([[1.0, 0.5], [0.0, 1.0], [1.0, -1.0]])
    scores = ssd.ssd_scores(train, test)
    np.testing.assert_allclose(scores, _reference_scores(train, test), rtol=1e-8)
    assert scores[2] > scores[1] > 0


def test_singular_covariance_uses_pinv_and_stays_finite():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(10, 2))
    train = np.concatenate([base, base[:, :1]], axis=1)  # rank-deficient 3-D features
    scores = ssd.ssd_scores(train, train[:4] + 0.1)
    assert np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores, _reference_scores(train, train[:4] + 0.1), rtol=1e-6, atol=1e-8)


def test_metrics_are_sklearn_with_anomalies_positive():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(60, 4)) + [5, 0, 0, 0]
    test = np.concatenate([rng.normal(size=(20, 4)) + [5, 0, 0, 0], rng.normal(size=(10, 4)) + [0, 5, 0, 0]])
    target = np.r_[np.zeros(20), np.ones(10)]
    out = ssd.ssd_evaluate(train, test, target)
    scores = _reference_scores(train, test)
    assert out["auroc"] == pytest.approx(roc_auc_score(target, scores))
    assert out["aupr"] == pytest.approx(average_precision_score(target, scores))
    assert out["auroc"] > 0.8  # points in another direction are anomalous
    assert 0.0 <= out["fpr95"] <= 1.0


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_k_clusters_is_min_over_cluster_distances(method):
    rng = np.random.default_rng(3)
    train = np.concatenate([rng.normal(size=(50, 3)) + [6, 0, 0], rng.normal(size=(50, 3)) - [6, 0, 0]])
    test = rng.normal(size=(8, 3)) * 3
    scores = ssd.ssd_scores(train, test, clusters=2, cluster_method=method, seed=0)
    tr, te = ssd.preprocess(train, test)
    labels = (tr[:, 0] > 0).astype(int)  # the two blobs, as any sane clustering finds them
    expected = np.minimum(ssd.mahalanobis_scores(tr[labels == 0], te), ssd.mahalanobis_scores(tr[labels == 1], te))
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
