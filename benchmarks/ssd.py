"""SSD evaluation (Sehwag et al., ICLR 2021) as the CMDA code runs it (official-code notes §4).

1. L2-normalise every feature row (+1e-10).
2. z-score every set with the per-dimension mean and std of the *train* features (+1e-10).
3. Score = squared Mahalanobis distance to the train features, covariance pseudo-inverse,
   MLE covariance (``np.cov(bias=True)``). With ``clusters=k > 1`` the train features are
   clustered (k-means, or our :class:`~cmda_data.GaussianMixture`) and the score is the
   minimum over clusters of the per-cluster distance.
4. AUROC / AUPR with ``sklearn.metrics``; anomalies are the positive class (AUPR-Out,
   average precision).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

__all__ = ["mahalanobis_scores", "preprocess", "ssd_evaluate", "ssd_scores"]

EPS = 1e-10


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def preprocess(train: Any, *others: Any) -> tuple:
    """L2-normalise rows, then z-score everything with the train mean / std."""
    arrays = [_numpy(a) for a in (train, *others)]
    arrays = [a / (np.linalg.norm(a, axis=1, keepdims=True) + EPS) for a in arrays]
    mean, std = arrays[0].mean(axis=0, keepdims=True), arrays[0].std(axis=0, keepdims=True)
    return tuple((a - mean) / (std + EPS) for a in arrays)


def mahalanobis_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of ``test`` rows to ``train`` (MLE covariance, pinv)."""
    mean = train.mean(axis=0)
    precision = np.linalg.pinv(np.cov(train, rowvar=False, bias=True))
    diff = test - mean
    return np.einsum("ij,jk,ik->i", diff, precision, diff)


def _cluster_labels(train: np.ndarray, clusters: int, method: str, seed: int) -> np.ndarray:
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(clusters, n_init=3, max_iter=100, random_state=seed).fit_predict(train)
    if method == "gmm":
        import torch

        from cmda_data.core.mixture import GaussianMixture

        gmm = GaussianMixture(clusters, covariance_type="diag", random_state=seed)
        return gmm.fit_predict(torch.from_numpy(train).float()).cpu().numpy()
    raise ValueError(f"cluster_method: expected 'kmeans' or 'gmm', got {method!r}")


def ssd_scores(train: Any, test: Any, *, clusters: int = 1, cluster_method: str = "kmeans",
               seed: int = 0) -> np.ndarray:
    """Anomaly scores of ``test`` given the normal ``train`` features (higher = more anomalous)."""
    train_z, test_z = preprocess(train, test)
    if clusters == 1:
        return mahalanobis_scores(train_z, test_z)
    labels = _cluster_labels(train_z, clusters, cluster_method, seed)
    scores = [mahalanobis_scores(train_z[labels == c], test_z) for c in np.unique(labels)
              if (labels == c).sum() > 1]
    return np.min(np.stack(scores), axis=0)


def ssd_evaluate(train: Any, test: Any, target: Any, *, clusters: int = 1, cluster_method: str = "kmeans",
                 seed: int = 0) -> Dict[str, float]:
    """``{"auroc", "aupr", "fpr95"}`` of the SSD scores; ``target`` 1 = anomaly (positive)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = ssd_scores(train, test, clusters=clusters, cluster_method=cluster_method, seed=seed)
    target = _numpy(target).astype(int)
    if not np.all(np.isfinite(scores)):
        raise ValueError("ssd_evaluate: non-finite anomaly scores (features contain NaN or Inf?)")
    inlier = scores[target == 0]
    threshold = np.percentile(inlier, 95) if inlier.size else np.inf
    fpr95 = float(np.mean(scores[target == 1] < threshold)) if (target == 1).any() else float("nan")
    return {"auroc": float(roc_auc_score(target, scores)), "aupr": float(average_precision_score(target, scores)),
            "fpr95": fpr95}


def summary(result: Optional[Dict[str, float]]) -> str:
    return "" if result is None else f"AUROC {100 * result['auroc']:.2f}  AUPR {100 * result['aupr']:.2f}"
