"""The Wikipedia cross-modal data set (Rasiwasia et al., ACM MM 2010) as paired features.

2,866 image-text pairs in 10 classes with the official split of 2,173 train and 693 test
pairs (the paper's Section IV-A says 2,273 / 593; the data's list files say 2,173 / 693,
which is what is used here). Rows follow the list files: ``trainset_txt_img_cat.list``
then ``testset_txt_img_cat.list``; every feature file is stored in that order (see
``wikipedia/SOURCE.md``).

Image features: ``"sift128"`` (SIFT bag-of-visual-words histograms, ``raw_features.mat``
``I_tr``/``I_te``; the raw images are not distributed). Text features: ``"minilm384"``
(L2-normalised all-MiniLM-L6-v2 embeddings), ``"lda10"`` (``T_tr``/``T_te``) or
``"lda50"``. The raw article sections (``texts/<text_id>.xml``) come with
``raw_text=True`` or :func:`wikipedia_article`.

Reading ``.mat`` files needs scipy (``pip install -e '.[bench]'``); it is imported only
here, only when called.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..core._validation import check_option, fail
from ..exceptions import MissingDependencyError, ShapeError, ValidationError
from ._paired import PairedFeatureDataset
from ._paths import PathLike, dataset_dir, require_file

__all__ = ["IMAGE_FEATURES", "TEXT_FEATURES", "load_wikipedia", "wikipedia_article"]

NAME = "wikipedia"
IMAGE_FEATURES = ("sift128",)
TEXT_FEATURES = ("minilm384", "lda10", "lda50")
SPLITS = ("train", "test", "all")

_TEXT_RE = re.compile(r"<text>(.*?)</text>", re.S)


def read_list(path: Path) -> List[Tuple[str, str, int]]:
    """Rows ``(text_id, image_id, class_id_0_based)`` of a ``*_txt_img_cat.list`` file.

    Class ids in the file are 1-based; they are returned 0-based.
    """
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3 or not parts[2].strip().isdigit():
            fail(f"{path.name} line {number}", "text_id<TAB>image_id<TAB>class", line, ValidationError)
        rows.append((parts[0].strip(), parts[1].strip(), int(parts[2]) - 1))
    return rows


def read_names(path: Path) -> List[str]:
    """Class names of a ``categories.list`` file (one per line, in class order)."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError as error:
        fail("scipy", f"the optional dependency scipy to read {path.name} "
             "(pip install -e '.[bench]', or pip install scipy)", repr(error),
             MissingDependencyError, raw=True)
    return loadmat(str(path))


def _matrix(mat: dict, key: str, rows: int, file: str) -> np.ndarray:
    if key not in mat:
        fail(f"{file}", f"a variable {key!r}", sorted(k for k in mat if not k.startswith("__")),
             ValidationError)
    value = np.asarray(mat[key])
    if value.ndim != 2 or value.shape[0] != rows:
        fail(f"{file} {key}", f"a 2-D array with {rows} rows (the list files' order)",
             value, ShapeError)
    return value


def _read_article(path: Path, unescape: bool = True) -> str:
    # The xml files use HTML entities (&ndash; ...) and bare '&': not well-formed XML,
    # so the <text> element is cut out with a regular expression (and unescaped).
    match = _TEXT_RE.search(path.read_text(encoding="utf-8"))
    if match is None:
        fail(path.name, "a <text>...</text> element", "none", ValidationError, raw=True)
    return html.unescape(match.group(1)).strip() if unescape else match.group(1)


def wikipedia_article(text_id: str, root: Optional[PathLike] = None, *, unescape: bool = True) -> str:
    """The raw article section of ``text_id`` (``texts/<text_id>.xml``, ``<text>``).

    Args:
        text_id: the text id of a pair (``sample["text_id"]``).
        root: the data folder (see :func:`cmda_data.datasets.data_root`).
        unescape: decode HTML entities (``&ndash;`` ...) and strip outer whitespace. The
            shipped ``derived_minilm_l6_text_emb.npy`` was computed from the element as is
            (``unescape=False``); 379 of the 2,866 rows differ otherwise.

    Returns:
        The text of the ``<text>`` element.

    Raises:
        DataNotFoundError: the xml file is missing.

    Examples:
        >>> wikipedia_article("00565641497ba8b5495165a47d20a528-2")[:14]  # doctest: +SKIP
        'Bourdon joined'
    """
    folder = dataset_dir(NAME, root)
    return _read_article(require_file(folder, f"texts/{text_id}.xml", dataset=NAME), unescape)


def load_wikipedia(root: Optional[PathLike] = None, *, image_features: str = "sift128",
                   text_features: str = "minilm384", split: str = "train",
                   raw_text: bool = False) -> PairedFeatureDataset:
    """Load the Wikipedia pairs of one split as a :class:`PairedFeatureDataset`.

    Args:
        root: the ``wikipedia`` folder or the folder that holds it; default
            ``$CMDA_DATA_DIR`` or ``<repo>/../shared/data``.
        image_features: ``"sift128"``.
        text_features: ``"minilm384"``, ``"lda10"`` or ``"lda50"``.
        split: ``"train"`` (2,173 pairs), ``"test"`` (693) or ``"all"`` (2,866, train
            rows first).
        raw_text: also read every article section into ``sample["caption"]``.

    Returns:
        Samples ``{"image": float32 [128], "text": float32 [d], "label": int,
        "row": row in the full table, "text_id": str}`` (+ ``"caption"``); the
        dataset has ``class_names`` (art ... warfare), ``is_train``, ``labels``.

    Raises:
        DataNotFoundError: a file is missing (the message names it and ``CMDA_DATA_DIR``).
        MissingDependencyError: scipy is not installed.
        ShapeError: a feature file does not match the list files.

    Examples:
        >>> train = load_wikipedia(split="train", text_features="lda10")  # doctest: +SKIP
        >>> len(train), train.dims  # doctest: +SKIP
        (2173, {'image': 128, 'text': 10})
    """
    check_option("image_features", image_features, IMAGE_FEATURES)
    check_option("text_features", text_features, TEXT_FEATURES)
    check_option("split", split, SPLITS)
    folder = dataset_dir(NAME, root)
    train_rows = read_list(require_file(folder, "trainset_txt_img_cat.list", dataset=NAME))
    test_rows = read_list(require_file(folder, "testset_txt_img_cat.list", dataset=NAME))
    class_names = read_names(require_file(folder, "categories.list", dataset=NAME))
    n_train, n_test = len(train_rows), len(test_rows)
    table = train_rows + test_rows
    labels = np.array([label for _, _, label in table], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        fail("wikipedia list files", f"classes 1..{len(class_names)} (categories.list)",
             f"classes {labels.min() + 1}..{labels.max() + 1}", ValidationError, raw=True)

    mat = _loadmat(require_file(folder, "raw_features.mat", dataset=NAME))
    image = np.concatenate([_matrix(mat, "I_tr", n_train, "raw_features.mat"),
                            _matrix(mat, "I_te", n_test, "raw_features.mat")])
    if text_features == "lda10":
        text = np.concatenate([_matrix(mat, "T_tr", n_train, "raw_features.mat"),
                               _matrix(mat, "T_te", n_test, "raw_features.mat")])
    elif text_features == "lda50":
        lda = _loadmat(require_file(folder, "lda50_tongjiayan.mat", dataset=NAME))
        text = _matrix(lda, "text", n_train + n_test, "lda50_tongjiayan.mat")
    else:
        path = require_file(folder, "derived_minilm_l6_text_emb.npy", dataset=NAME)
        text = np.load(path, allow_pickle=False)
        if text.ndim != 2 or text.shape[0] != n_train + n_test:
            fail(path.name, f"a 2-D array with {n_train + n_test} rows", text, ShapeError)

    is_train = np.arange(n_train + n_test) < n_train
    selected = {"train": np.flatnonzero(is_train), "test": np.flatnonzero(~is_train),
                "all": np.arange(n_train + n_test)}[split]
    text_ids = [table[r][0] for r in selected]
    captions = None
    if raw_text:
        captions = [_read_article(require_file(folder, f"texts/{t}.xml", dataset=NAME)) for t in text_ids]
    return PairedFeatureDataset(
        torch.from_numpy(np.ascontiguousarray(image[selected], dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(text[selected], dtype=np.float32)),
        torch.from_numpy(labels[selected]),
        rows=torch.from_numpy(selected.astype(np.int64)), is_train=torch.from_numpy(is_train[selected]),
        class_names=class_names, text_ids=text_ids, captions=captions, name=NAME, split=split)
