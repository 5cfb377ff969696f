"""Paired data sets: the built-in demo shapes and loaders for the real data.

- :class:`ShapesDataset`: procedurally drawn coloured shapes with captions and
  bag-of-words caption vectors; no download (the data of ``cmda demo``).
- :func:`load_wikipedia`: the Wikipedia cross-modal data set (SIFT-128 images, MiniLM /
  LDA text features, raw article texts), official 2,173 / 693 split.
- :func:`load_webnews`: Web News (Chinese news photos and captions, EfficientNet-Lite0 and
  e5 features, or decoded photos), 1,696 / 497 split.
- :func:`anomaly_split`, :func:`classification_split`, :func:`validation_split`: index
  arrays of the paper's tasks (Section IV-A), with :data:`WIKIPEDIA_NORMAL_CLASSES` and
  :data:`WEBNEWS_NORMAL_CLASSES`.

The real data is found in ``root=``, else ``$CMDA_DATA_DIR``, else ``<repo>/../shared/data``;
a missing file raises :class:`DataNotFoundError` naming the file and ``CMDA_DATA_DIR``.
Only torch and numpy are imported here; scipy (``.mat`` files) and Pillow (photos) are
imported when a loader needs them.
"""

from __future__ import annotations

from ._paired import PairedFeatureDataset
from ._paths import ENV_VAR, DataNotFoundError, data_root
from ._splits import (
    WEBNEWS_NORMAL_CLASSES,
    WIKIPEDIA_NORMAL_CLASSES,
    anomaly_split,
    classification_split,
    validation_split,
)
from .shapes import ShapesDataset, caption_embedding
from .webnews import WebNewsPhotos, decode_image, load_webnews
from .wikipedia import load_wikipedia, wikipedia_article

__all__ = [
    "DataNotFoundError",
    "ENV_VAR",
    "PairedFeatureDataset",
    "ShapesDataset",
    "WEBNEWS_NORMAL_CLASSES",
    "WIKIPEDIA_NORMAL_CLASSES",
    "WebNewsPhotos",
    "anomaly_split",
    "caption_embedding",
    "classification_split",
    "data_root",
    "decode_image",
    "load_webnews",
    "load_wikipedia",
    "validation_split",
    "wikipedia_article",
]
