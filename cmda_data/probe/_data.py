"""Read and check the arrays of a probe (an ``.npz`` file or a mapping) and split the rows."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, NoReturn, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core._validation import check_int, fail
from ..exceptions import ShapeError

SPLIT_SEED = 0


@dataclass(frozen=True)
class ProbeData:
    """The checked arrays of a probe: float32 features, labels as class positions ``0..C-1``.

    ``classes`` holds the original label value of each position; ``source`` the file name
    and its SHA-256 (both None for an in-memory mapping).
    """

    student: np.ndarray
    teacher: np.ndarray
    labels: np.ndarray
    classes: Tuple[Any, ...]
    keys: Dict[str, str]
    source: Dict[str, Optional[str]]


def load_probe_data(data: Any, *, student: str, teacher: str, label: str) -> ProbeData:
    """Read and check the three arrays of a probe (``data``: an ``.npz`` path or a mapping).

    Never unpickles: an object array is refused. Each error is one line naming the key.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> arrays = {"x": rng.normal(size=(6, 3)), "t": rng.normal(size=(6, 2)), "y": [0, 0, 0, 1, 1, 1]}
        >>> d = load_probe_data(arrays, student="x", teacher="t", label="y")
        >>> d.student.dtype, d.labels.tolist(), d.classes
        (dtype('float32'), [0, 0, 0, 1, 1, 1], (0, 1))
        >>> load_probe_data(arrays, student="img", teacher="t", label="y")
        Traceback (most recent call last):
        ...
        cmda_data.exceptions.ValidationError: student key 'img': expected one of the keys of the data
        ('t', 'x', 'y'), got 'img'
    """
    keys = {"student": student, "teacher": teacher, "label": label}
    for role, key in keys.items():
        if not isinstance(key, str) or not key:
            fail(role, "the name of an array in the data (a non-empty str)", key)
    raw, source = _read(data, keys)
    x = _features(raw["student"], f"student key {student!r}")
    t = _features(raw["teacher"], f"teacher key {teacher!r}")
    y = _labels(raw["label"], f"label key {label!r}")
    for role, array in (("teacher", t), ("label", y)):
        if len(array) != len(x):
            fail(f"{role} key {keys[role]!r}", f"{len(x)} rows (as student key {student!r})", f"{len(array)} rows",
                 ShapeError, raw=True)
    classes, positions, counts = np.unique(y, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        fail(f"label key {label!r}", "at least 2 classes", f"{len(classes)} class ({_value(classes[0])})",
             raw=True)
    if counts.min() < 2:
        small = classes[counts < 2]
        fail(f"label key {label!r}", "at least 2 rows per class (one to train on, one to test on)",
             f"1 row of class {', '.join(str(_value(c)) for c in small[:5])}" + (" ..." if len(small) > 5 else ""),
             raw=True)
    return ProbeData(student=x, teacher=t, labels=positions.astype(np.int64), keys=keys, source=source,
                     classes=tuple(_value(c) for c in classes))


def _read(data: Any, keys: Mapping[str, str]) -> Tuple[Dict[str, np.ndarray], Dict[str, Optional[str]]]:
    """The three arrays (by role) and where they came from."""
    if isinstance(data, Mapping):
        available = sorted(map(str, data))
        raw = {role: _array(data[key], role, key) if key in data else _missing(role, key, available)
               for role, key in keys.items()}
        return raw, {"file": None, "sha256": None}
    if not isinstance(data, (str, os.PathLike)):
        fail("data", "a path to an .npz file or a mapping of arrays", data)
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"data: expected an existing .npz file, got {str(data)!r} (no such file)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        fail("data", "an .npz archive of named arrays (numpy.savez)", f"{path.name!r}: {error}", raw=True)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        fail("data", "an .npz archive of named arrays (numpy.savez), not a single .npy array",
             f"{path.name!r} with one array of shape {getattr(archive, 'shape', None)}", raw=True)
    with archive:
        available = sorted(archive.files)
        raw = {}
        for role, key in keys.items():
            if key not in archive.files:
                _missing(role, key, available)
            try:
                raw[role] = archive[key]
            except ValueError as error:  # an object array: numpy refuses to unpickle it
                fail(f"{role} key {key!r}", "a numeric array (an object array would need pickle, which is never "
                     "loaded)", f"{error}", raw=True)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return raw, {"file": path.name, "sha256": digest.hexdigest()}


def _missing(role: str, key: str, available: Sequence[str]) -> NoReturn:
    fail(f"{role} key {key!r}", f"one of the keys of the data ({', '.join(map(repr, available))})", repr(key),
         raw=True)


def _array(value: Any, role: str, key: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except ValueError as error:  # e.g. ragged nested lists
        fail(f"{role} key {key!r}", "an array (rows of equal length)", f"{error}", raw=True)
    if array.dtype == object:
        fail(f"{role} key {key!r}", "a numeric array", "an object array", raw=True)
    return array


def _features(array: np.ndarray, name: str) -> np.ndarray:
    if np.issubdtype(array.dtype, np.complexfloating):
        fail(name, "real-valued features", f"complex dtype {array.dtype}", raw=True)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        fail(name, "numeric features (float or int)", f"dtype {array.dtype}", raw=True)
    if array.ndim != 2:
        hint = " (one feature per row: x.reshape(-1, 1))" if array.ndim == 1 else ""
        fail(name, "a 2-D array [N, d] of features" + hint, f"shape {array.shape}", ShapeError, raw=True)
    if array.shape[0] == 0 or array.shape[1] == 0:
        fail(name, "at least one row and one feature", f"shape {array.shape}", ShapeError, raw=True)
    out = array.astype(np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        rows = np.flatnonzero(~finite.all(axis=1))
        fail(name, "finite features (no NaN or inf)", f"{len(rows)} rows with NaN or inf (first: row {rows[0]})",
             raw=True)
    return out


def _labels(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim != 1:
        fail(name, "a 1-D array [N] of integer class labels", f"shape {array.shape}", ShapeError, raw=True)
    if array.dtype == np.bool_:
        fail(name, "integer class labels", "booleans (use y.astype(int) if they are two classes)", raw=True)
    if array.dtype.kind in "USO":
        fail(name, "integer class labels", f"strings (dtype {array.dtype}); map them to integers first, e.g. "
             "numpy.unique(y, return_inverse=True)[1]", raw=True)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.floating):
        fail(name, "integer class labels", f"dtype {array.dtype}", raw=True)
    bad = ~np.isfinite(array) | (array != np.round(array))
    if bad.any():
        fail(name, "integer class labels", f"float values such as {float(array[np.flatnonzero(bad)[0]])!r} "
             f"({int(bad.sum())} rows that are not whole numbers)", raw=True)
    return array.astype(np.int64)


def _value(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def split_stratified(labels: Any, *, train_size: Optional[int] = None, train_frac: Optional[float] = None,
                     seed: int = SPLIT_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, test)`` row indices with every class in both parts.

    Each class gets ``train_size`` (or ``train_frac``, default 0.8) of its rows up to
    rounding (largest remainders), at least one row on each side; the rows of a class are
    chosen by ``numpy.random.default_rng(seed)``.

    Examples:
        >>> train, test = split_stratified([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], train_frac=0.5)
        >>> len(train), len(test), sorted(set(np.asarray([0] * 4 + [1] * 6)[test].tolist()))
        (5, 5, [0, 1])
    """
    y = np.asarray(labels)
    n = len(y)
    classes, positions, counts = np.unique(y, return_inverse=True, return_counts=True)
    if y.ndim != 1 or len(classes) < 2 or counts.min() < 2:
        fail("labels", "1-D labels of at least 2 classes, each with at least 2 rows", y)
    if train_size is not None and train_frac is not None:
        fail("train_size", "either train_size or train_frac, not both",
             f"train_size={train_size} and train_frac={train_frac}", raw=True)
    if train_size is not None:
        n_train = check_int("train_size", train_size, minimum=1)
    else:
        frac = 0.8 if train_frac is None else train_frac
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < frac < 1.0:
            fail("train_frac", "a fraction strictly between 0 and 1", frac)
        n_train = round(frac * n)
    name = "train_size" if train_size is not None else "train_frac"
    if n_train < len(classes):
        fail(name, f"at least {len(classes)} train rows (one per class)", f"{n_train} train rows", raw=True)
    if n_train > n - len(classes):
        fail(name, f"a test split with a row of every class (at most {n - len(classes)} train rows of {n})",
             f"{n_train} train rows (leaving {n - n_train} test rows)", raw=True)
    exact = n_train * counts / n
    take = np.clip(np.floor(exact).astype(np.int64), 1, counts - 1)
    while take.sum() != n_train:  # largest remainders first (the bounds above always leave room)
        remainder = exact - take
        if take.sum() < n_train:
            take[np.argmax(np.where(take < counts - 1, remainder, -np.inf))] += 1
        else:
            take[np.argmin(np.where(take > 1, remainder, np.inf))] -= 1
    rng = np.random.default_rng(seed)
    train = [rng.permutation(np.flatnonzero(positions == c))[:take[c]] for c in range(len(classes))]
    train_rows = np.sort(np.concatenate(train))
    test_rows = np.setdiff1d(np.arange(n), train_rows)
    return train_rows, test_rows
