"""Anomaly-detection, classification and validation splits as index arrays (private).

Section IV-A of the paper splits Wikipedia into "normal samples (3 classes, totaling 921)
and abnormal samples (7 classes, totaling 1,945)". The class counts of the data
(art 172, biology 360, geography 340, history 333, literature 267, media 236, music 237,
royalty 185, sport 285, warfare 451) admit exactly one triple that sums to 921:
**royalty + sport + warfare = 185 + 285 + 451** (class ids 7, 8, 9), so
:data:`WIKIPEDIA_NORMAL_CLASSES` is ``(7, 8, 9)``.

Web News has no split in the paper. :data:`WEBNEWS_NORMAL_CLASSES` is the equivalent by
share: of all 120 triples of its 10 classes, **economy + people's_livelihood + sports**
(ids 2, 6, 9: 175 + 387 + 143 = 705 of 2,193 pairs, 32.15 %) is the one whose share is
closest to Wikipedia's 921 / 2,866 = 32.14 %.

The detector trains on the normal samples of the official *train* split only. The test
set is, by default (``variant="split"``), the test-split normals plus the test-split
anomalies; ``variant="all_abnormal"`` tests on the test-split normals plus *every*
anomaly (both splits: 1,945 on Wikipedia), which is how the paper's totals read.
Anomalies are the positive class (target 1). Sizes (train normal / test normal / test
anomaly, ``"split"`` and ``"all_abnormal"``): Wikipedia 705 / 216 / 477 or 1,945;
Web News 545 / 160 / 337 or 1,488.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import numpy as np
import torch

from ..core._validation import check_option, check_same_size, fail
from ..exceptions import ShapeError, ValidationError

__all__ = [
    "WEBNEWS_NORMAL_CLASSES",
    "WIKIPEDIA_NORMAL_CLASSES",
    "anomaly_split",
    "classification_split",
    "validation_split",
]

#: Wikipedia normal classes of the paper: royalty, sport, warfare (921 of 2,866 pairs)
WIKIPEDIA_NORMAL_CLASSES: Tuple[int, ...] = (7, 8, 9)
#: Web News normal classes: economy, people's_livelihood, sports (705 of 2,193 pairs)
WEBNEWS_NORMAL_CLASSES: Tuple[int, ...] = (2, 6, 9)


def _as_int_array(name: str, values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        fail(name, "a 1-D array of integers", array, ShapeError)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        fail(name, "a 1-D array of integers", array)
    return array.astype(np.int64, copy=False)


def _as_bool_array(name: str, values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        fail(name, "a 1-D boolean array (True = official train split)", array, ShapeError)
    if array.dtype != np.bool_:
        fail(name, "a 1-D boolean array (True = official train split)", array)
    return array


def anomaly_split(labels: Any, normal_classes: Iterable[int], is_train: Any, *,
                  variant: str = "split") -> Dict[str, np.ndarray]:
    """Index arrays of a one-class anomaly-detection task; anomalies are positive.

    Args:
        labels: class id of every row, shape ``[N]``.
        normal_classes: the classes whose samples are normal (e.g.
            :data:`WIKIPEDIA_NORMAL_CLASSES`).
        is_train: ``[N]`` booleans, True for rows of the official train split.
        variant: ``"split"`` tests on the test-split normals and test-split anomalies;
            ``"all_abnormal"`` tests on the test-split normals and every anomaly of both
            splits (the paper's totals).

    Returns:
        A dict of sorted int64 row arrays ``train_normal``, ``test_normal``,
        ``test_anomaly``, ``test`` (test normals then test anomalies), and
        ``test_target`` (``[len(test)]``, 1 = anomaly, 0 = normal).

    Raises:
        ValidationError: unknown variant, a normal class absent from ``labels``, or no
            anomaly left.
        ShapeError: ``labels`` and ``is_train`` differ in length.

    Examples:
        >>> labels = [0, 1, 2, 0, 1, 2, 0, 2]
        >>> is_train = [True, True, True, True, False, False, False, False]
        >>> parts = anomaly_split(labels, [0], is_train)
        >>> parts["train_normal"].tolist(), parts["test"].tolist(), parts["test_target"].tolist()
        ([0, 3], [6, 4, 5, 7], [0, 1, 1, 1])
        >>> anomaly_split(labels, [0], is_train, variant="all_abnormal")["test_anomaly"].tolist()
        [1, 2, 4, 5, 7]
    """
    labels = _as_int_array("labels", labels)
    is_train = _as_bool_array("is_train", is_train)
    check_same_size("labels", labels.size, "is_train", is_train.size, what="length")
    check_option("variant", variant, ("split", "all_abnormal"))
    normal = tuple(int(c) for c in normal_classes)
    present = set(np.unique(labels).tolist())
    missing = [c for c in normal if c not in present]
    if not normal or missing:
        fail("normal_classes", f"a non-empty list of classes present in labels {sorted(present)}",
             list(normal))
    is_normal = np.isin(labels, normal)
    train_normal = np.flatnonzero(is_normal & is_train)
    test_normal = np.flatnonzero(is_normal & ~is_train)
    if variant == "split":
        test_anomaly = np.flatnonzero(~is_normal & ~is_train)
    else:
        test_anomaly = np.flatnonzero(~is_normal)
    if test_anomaly.size == 0:
        fail("normal_classes", "to leave at least one anomaly in the test set", list(normal))
    test = np.concatenate([test_normal, test_anomaly])
    target = np.concatenate([np.zeros(test_normal.size, np.int64), np.ones(test_anomaly.size, np.int64)])
    return {"train_normal": train_normal, "test_normal": test_normal, "test_anomaly": test_anomaly,
            "test": test, "test_target": target}


def classification_split(is_train: Any) -> Dict[str, np.ndarray]:
    """The official train/test split as sorted int64 row arrays.

    Args:
        is_train: ``[N]`` booleans, True for rows of the official train split.

    Returns:
        ``{"train": rows, "test": rows}``.

    Examples:
        >>> {k: v.tolist() for k, v in classification_split([True, False, True]).items()}
        {'train': [0, 2], 'test': [1]}
    """
    is_train = _as_bool_array("is_train", is_train)
    return {"train": np.flatnonzero(is_train), "test": np.flatnonzero(~is_train)}


def _allocate(counts: np.ndarray, fraction: float) -> List[int]:
    """Per-class validation sizes: ``floor(fraction * n + 1/2)`` in all, split by largest
    remainders (ties to the lower class id); then at least 1 and at most ``n_c - 1``
    for a class of ``n_c >= 2`` rows, 0 for a class of one row."""
    quotas = fraction * counts.astype(np.float64)
    takes = np.floor(quotas).astype(np.int64)
    left = int(np.floor(fraction * counts.sum() + 0.5)) - int(takes.sum())
    for k in np.argsort(-(quotas - takes), kind="stable")[:max(left, 0)]:
        takes[k] += 1
    return [0 if n < 2 else int(min(max(t, 1), n - 1)) for n, t in zip(counts, takes)]


def validation_split(indices: Any, labels: Any, *, fraction: float = 0.2,
                     seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Carve a stratified validation set out of ``indices`` (e.g. the train rows).

    ``round(fraction * n)`` rows go to validation, shared over the classes in proportion
    to their sizes (largest remainders: each class gives ``floor`` or ``ceil`` of
    ``fraction * n_c``), at least 1 and at most ``n_c - 1`` rows of a class with
    ``n_c >= 2`` rows (a class with one row stays in train). Which rows is drawn with an explicit ``torch.Generator`` seeded by
    ``seed``: the same arguments always give the same split; the global RNG is untouched.

    Args:
        indices: rows to split, ``[n]`` integers (unique).
        labels: the class of *every* row of the data set, indexed by ``indices``
            (``labels[indices]`` are the classes of the rows to split).
        fraction: share of each class that goes to validation, in (0, 1).
        seed: the seed of the draw.

    Returns:
        ``(train_rows, validation_rows)``, two disjoint sorted int64 arrays whose union
        is ``indices``.

    Examples:
        >>> labels = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
        >>> train, val = validation_split(list(range(10)), labels, fraction=0.4, seed=0)
        >>> len(train), len(val), sorted(set(labels[i] for i in val.tolist()))
        (6, 4, [0, 1])
    """
    rows = _as_int_array("indices", indices)
    labels = _as_int_array("labels", labels)
    if np.unique(rows).size != rows.size:
        fail("indices", "unique row indices", f"{rows.size - np.unique(rows).size} duplicates", raw=True)
    if rows.size and (rows.min() < 0 or rows.max() >= labels.size):
        fail("indices", f"rows in [0, {labels.size})", f"values in [{rows.min()}, {rows.max()}]", raw=True)
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        fail("fraction", "a number in (0, 1)", fraction)
    if not 0.0 < fraction < 1.0 or isinstance(fraction, bool):
        fail("fraction", "a number in (0, 1)", fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        fail("seed", "an integer", seed, ValidationError)
    generator = torch.Generator().manual_seed(int(seed))
    row_labels = labels[rows]
    classes, counts = np.unique(row_labels, return_counts=True)  # sorted: fixed draw order
    takes = _allocate(counts, fraction)
    validation = []
    for cls, count, take in zip(classes, counts, takes):
        members = np.sort(rows[row_labels == cls])
        order = torch.randperm(int(count), generator=generator).numpy()
        validation.append(members[order[:take]])
    val = np.sort(np.concatenate(validation)) if validation else np.zeros(0, np.int64)
    train = np.setdiff1d(rows, val)
    return train.astype(np.int64), val.astype(np.int64)
