"""The Web News data set: Chinese news photos with captions, 10 classes.

Rows follow ``derived_index.tsv`` (``text_id, image_path, label0, split``): the 2,193
usable pairs of the repository's 2,200 (7 list rows have no photo and 7 photos are in no
list), **1,696 train / 497 test** as the files say (the issue text said 1,694 / 499).
Row ``r`` of ``derived_effnet_lite0_img_feat.npy`` (1280-d EfficientNet-Lite0 features)
and of ``derived_e5_small_text_emb.npy`` (384-d multilingual-e5-small embeddings) belong
to row ``r`` of the index. Captions are ``texts/<text_id>.txt`` (UTF-8 Chinese); photos
are ``images/<category>/<id>.jpg`` (longer side <= 256 px in the shared copy; three file
names keep a space before ``.jpg``, as the index does).

``image="pixels"`` decodes photos lazily in ``__getitem__`` with Pillow (shipped with
torchvision and matplotlib; ``pip install -e '.[vision]'``), imported only then.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..core._validation import check_int, check_option, fail
from ..exceptions import MissingDependencyError, ShapeError, ValidationError
from ._paired import PairedFeatureDataset, _as_index
from ._paths import DataNotFoundError, PathLike, dataset_dir, require_file
from .wikipedia import read_names

__all__ = ["WebNewsPhotos", "decode_image", "load_webnews"]

NAME = "webnews"
IMAGE_MODES = ("features", "pixels")
RESIZE_MODES = ("crop", "pad", "stretch")
SPLITS = ("train", "test", "all")
_INDEX_COLUMNS = ["text_id", "image_path", "label0", "split"]


def _image_module() -> Any:
    try:
        from PIL import Image
    except ImportError as error:
        fail("Pillow", "the optional dependency Pillow to decode photos "
             "(pip install -e '.[vision]', or pip install pillow)", repr(error),
             MissingDependencyError, raw=True)
    return Image


def decode_image(path: PathLike, size: int, resize: str = "crop") -> torch.Tensor:
    """Decode a photo to a float32 ``[3, size, size]`` tensor in [0, 1].

    Args:
        path: an image file Pillow can read.
        size: output height and width.
        resize: ``"crop"`` (shorter side to ``size``, centre crop, as the features were
            computed), ``"pad"`` (longer side to ``size``, centred on black) or
            ``"stretch"`` (ignore the aspect ratio).

    Examples:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "red.png")
        >>> Image.new("RGB", (40, 20), (255, 0, 0)).save(path)
        >>> x = decode_image(path, 8)
        >>> tuple(x.shape), x.dtype, x[0].min().item(), x[1].max().item()
        ((3, 8, 8), torch.float32, 1.0, 0.0)
        >>> decode_image(path, 8, "pad")[0, 0, 0].item()  # the top rows are padding
        0.0
    """
    check_option("resize", resize, RESIZE_MODES)
    image_module = _image_module()
    bilinear = image_module.BILINEAR
    with image_module.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, still >= size
        img = img.convert("RGB")
        width, height = img.size
        if resize == "stretch":
            img = img.resize((size, size), bilinear)
        elif resize == "crop":
            scale = size / min(width, height)
            new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
            img = img.resize((new_w, new_h), bilinear)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        else:
            scale = size / max(width, height)
            new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
            canvas = image_module.new("RGB", (size, size), (0, 0, 0))
            canvas.paste(img.resize((new_w, new_h), bilinear), ((size - new_w) // 2, (size - new_h) // 2))
            img = canvas
        pixels = np.array(img, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32).div_(255.0)


class WebNewsPhotos(PairedFeatureDataset):
    """Web News pairs whose ``"image"`` is the decoded photo (float32 ``[3, S, S]``).

    Photos are decoded in ``__getitem__`` (worker processes decode in parallel). With
    ``cache=True`` each decoded photo is kept as uint8 (``3 * S * S`` bytes; about 27 MB
    for all 2,193 photos at 64 px), per process.

    Args:
        folder: the ``webnews`` folder.
        image_paths: each sample's photo, relative to ``folder``.
        image_size: output height and width ``S``.
        resize: see :func:`decode_image`.
        cache: keep decoded photos in memory.
        **kwargs: the :class:`PairedFeatureDataset` arguments except ``image``.
    """

    def __init__(self, folder: Path, image_paths: List[str], *, image_size: int = 64,
                 resize: str = "crop", cache: bool = False, **kwargs: Any) -> None:
        super().__init__(None, **kwargs)
        if len(image_paths) != len(self):
            fail("image_paths", f"{len(self)} paths", f"{len(image_paths)} paths", ShapeError, raw=True)
        self.folder = Path(folder)
        self.image_paths = list(image_paths)
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.resize = check_option("resize", resize, RESIZE_MODES)
        self.cache = bool(cache)
        self._cache: Dict[int, torch.Tensor] = {}

    def image_at(self, position: int) -> torch.Tensor:
        row = int(self.rows[position])
        cached = self._cache.get(row)
        if cached is not None:
            return cached.to(torch.float32).div_(255.0)
        image = decode_image(self.folder / self.image_paths[position], self.image_size, self.resize)
        if self.cache:
            self._cache[row] = image.mul(255.0).round_().to(torch.uint8)
        return image

    def subset(self, positions: Any, *, split: Optional[str] = None) -> "WebNewsPhotos":
        if isinstance(positions, torch.Tensor):
            positions = positions.tolist()
        positions = [_as_index(p, len(self)) for p in positions]
        index = torch.as_tensor(positions, dtype=torch.int64)
        return WebNewsPhotos(
            self.folder, [self.image_paths[p] for p in positions], image_size=self.image_size,
            resize=self.resize, cache=self.cache, text=self.text[index], labels=self.labels[index],
            rows=self.rows[index], is_train=self.is_train[index], class_names=self.class_names,
            text_ids=self._take(self.text_ids, positions), captions=self._take(self.captions, positions),
            name=self.name, split=split or self.split)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", image_size={self.image_size}, resize={self.resize!r})"


def _read_index(path: Path) -> Dict[str, list]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != _INDEX_COLUMNS:
            fail(path.name, "the header " + "\\t".join(_INDEX_COLUMNS), header, ValidationError)
        columns: Dict[str, list] = {name: [] for name in _INDEX_COLUMNS}
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 4 or not row[2].isdigit() or row[3] not in ("train", "test"):
                fail(f"{path.name} line {number}", "text_id, image_path, label0, train|test", row,
                     ValidationError)
            for name, value in zip(_INDEX_COLUMNS, row):
                columns[name].append(value)
    return columns


def _load_rows(folder: Path, file: str, rows: int) -> np.ndarray:
    path = require_file(folder, file, dataset=NAME)
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2 or array.shape[0] != rows:
        fail(file, f"a 2-D array with {rows} rows (one per derived_index.tsv row)", array, ShapeError)
    return array


def load_webnews(root: Optional[PathLike] = None, *, image: str = "features", image_size: int = 64,
                 split: str = "train", resize: str = "crop", cache: bool = False,
                 captions: bool = True) -> PairedFeatureDataset:
    """Load the Web News pairs of one split.

    Args:
        root: the ``webnews`` folder or the folder that holds it; default
            ``$CMDA_DATA_DIR`` or ``<repo>/../shared/data``.
        image: ``"features"`` (float32 [1280] EfficientNet-Lite0 vectors) or ``"pixels"``
            (photos decoded lazily to float32 ``[3, image_size, image_size]`` in [0, 1]).
        image_size: photo size for ``image="pixels"``.
        split: ``"train"`` (1,696 pairs), ``"test"`` (497) or ``"all"`` (2,193, index order).
        resize: how photos are fitted to a square, see :func:`decode_image`.
        cache: keep decoded photos in memory (``image="pixels"``).
        captions: read the Chinese captions into ``sample["caption"]``.

    Returns:
        Samples ``{"image", "text": float32 [384], "label": int, "row": row of
        derived_index.tsv, "text_id": str, "caption": str}``; a
        :class:`PairedFeatureDataset` (``image="features"``) or :class:`WebNewsPhotos`.

    Raises:
        DataNotFoundError: a file is missing (the message names it and ``CMDA_DATA_DIR``).
        ShapeError: a feature file's rows do not match ``derived_index.tsv``.

    Examples:
        >>> photos = load_webnews(image="pixels", image_size=64, split="test")  # doctest: +SKIP
        >>> photos[0]["image"].shape  # doctest: +SKIP
        torch.Size([3, 64, 64])
    """
    check_option("image", image, IMAGE_MODES)
    check_option("split", split, SPLITS)
    check_option("resize", resize, RESIZE_MODES)
    image_size = check_int("image_size", image_size, minimum=1)
    folder = dataset_dir(NAME, root)
    index = _read_index(require_file(folder, "derived_index.tsv", dataset=NAME))
    class_names = read_names(require_file(folder, "categories.list", dataset=NAME))
    n = len(index["text_id"])
    labels = np.array(index["label0"], dtype=np.int64)
    if n and labels.max() >= len(class_names):
        fail("derived_index.tsv label0", f"classes 0..{len(class_names) - 1} (categories.list)",
             f"class {labels.max()}", ValidationError, raw=True)
    is_train = np.array([s == "train" for s in index["split"]], dtype=bool)
    text = _load_rows(folder, "derived_e5_small_text_emb.npy", n)
    features = _load_rows(folder, "derived_effnet_lite0_img_feat.npy", n) if image == "features" else None

    selected = {"train": np.flatnonzero(is_train), "test": np.flatnonzero(~is_train),
                "all": np.arange(n)}[split]
    text_ids = [index["text_id"][r] for r in selected]
    caption_list = None
    if captions:
        caption_list = [require_file(folder, f"texts/{t}.txt", dataset=NAME).read_text(encoding="utf-8").strip()
                        for t in text_ids]
    common: Dict[str, Any] = dict(
        text=torch.from_numpy(np.ascontiguousarray(text[selected], dtype=np.float32)),
        labels=torch.from_numpy(labels[selected]), rows=torch.from_numpy(selected.astype(np.int64)),
        is_train=torch.from_numpy(is_train[selected]), class_names=class_names, text_ids=text_ids,
        captions=caption_list, name=NAME, split=split)
    if features is not None:
        return PairedFeatureDataset(torch.from_numpy(np.ascontiguousarray(features[selected], dtype=np.float32)),
                                    **common)
    image_paths = [index["image_path"][r] for r in selected]
    missing = [p for p in image_paths if not (folder / p).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{NAME} data: expected the file {folder / missing[0]} ({len(missing)} photos missing), "
            f"got no such file; set the environment variable CMDA_DATA_DIR to the data folder that "
            f"holds '{NAME}/', or pass root= to the loader")
    return WebNewsPhotos(folder, image_paths, image_size=image_size, resize=resize, cache=cache, **common)
