"""Real-data loaders (Wikipedia, Web News), paths and errors, anomaly/classification splits."""

from __future__ import annotations

import csv
import itertools
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_data
from torch.utils.data import DataLoader

from cmda_data.datasets import (
    WEBNEWS_NORMAL_CLASSES,
    WIKIPEDIA_NORMAL_CLASSES,
    DataNotFoundError,
    PairedFeatureDataset,
    anomaly_split,
    classification_split,
    data_root,
    decode_image,
    load_webnews,
    load_wikipedia,
    validation_split,
    wikipedia_article,
)
from cmda_data.exceptions import CMDAError, MissingDependencyError, ShapeError, ValidationError

# Class counts written out by hand from the list files (SOURCE.md: "class counts match the paper").
WIKI_NAMES = ["art", "biology", "geography", "history", "literature", "media", "music",
              "royalty", "sport", "warfare"]
WIKI_COUNTS = [172, 360, 340, 333, 267, 236, 237, 185, 285, 451]
WIKI_TRAIN_COUNTS = [138, 272, 244, 248, 202, 178, 186, 144, 214, 347]
WEBNEWS_COUNTS = [389, 271, 175, 146, 256, 115, 387, 132, 179, 143]
WEBNEWS_TRAIN_COUNTS = [302, 201, 135, 116, 196, 95, 297, 102, 139, 113]
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def wiki_all():
    require_data("wikipedia")
    return load_wikipedia(split="all", text_features="minilm384")


@pytest.fixture(scope="module")
def webnews_all():
    require_data("webnews")
    return load_webnews(split="all")


def _link_copy(source: Path, target: Path, skip: tuple = ()) -> Path:
    """A folder of symlinks to ``source``'s entries, without ``skip``."""
    target.mkdir()
    for entry in source.iterdir():
        if entry.name not in skip:
            (target / entry.name).symlink_to(entry)
    return target


# ---------------------------------------------------------------------- paths and errors
def test_missing_root_names_file_and_variable(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_wikipedia(root=tmp_path / "nowhere")
    message = str(info.value)
    assert "trainset_txt_img_cat.list" in message and str(tmp_path / "nowhere") in message
    assert "CMDA_DATA_DIR" in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CMDAError)
    with pytest.raises(DataNotFoundError, match=r"derived_index\.tsv.*CMDA_DATA_DIR"):
        load_webnews(root=tmp_path)


def test_environment_variable_sets_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CMDA_DATA_DIR", str(tmp_path))
    assert data_root() == tmp_path
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "wikipedia"))):
        load_wikipedia()
    monkeypatch.delenv("CMDA_DATA_DIR")
    assert data_root() == Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_root_may_be_the_folder_or_its_parent():
    folder = require_data("wikipedia")
    a = load_wikipedia(root=folder, text_features="lda10", split="test")
    b = load_wikipedia(root=folder.parent, text_features="lda10", split="test")
    assert torch.equal(a.text, b.text)


def test_missing_feature_file_is_named(tmp_path):
    copy = _link_copy(require_data("webnews"), tmp_path / "webnews", skip=("derived_e5_small_text_emb.npy",))
    with pytest.raises(DataNotFoundError, match=r"derived_e5_small_text_emb\.npy.*CMDA_DATA_DIR"):
        load_webnews(root=copy)


def test_row_count_mismatch_is_a_shape_error(tmp_path):
    copy = _link_copy(require_data("webnews"), tmp_path / "webnews", skip=("derived_e5_small_text_emb.npy",))
    np.save(copy / "derived_e5_small_text_emb.npy", np.zeros((10, 384), np.float32))
    with pytest.raises(ShapeError, match=r"derived_e5_small_text_emb\.npy: expected a 2-D array with 2193 rows"):
        load_webnews(root=copy)


@pytest.mark.parametrize(
    "loader, kwargs, match",
    [
        (load_wikipedia, {"text_features": "bert"}, r"text_features: expected one of 'minilm384', 'lda10', 'lda50'"),
        (load_wikipedia, {"image_features": "vgg"}, r"image_features: expected one of 'sift128'"),
        (load_wikipedia, {"split": "val"}, r"split: expected one of 'train', 'test', 'all'"),
        (load_webnews, {"image": "raw"}, r"image: expected one of 'features', 'pixels'"),
        (load_webnews, {"image_size": 0}, r"image_size: expected an integer >= 1"),
        (load_webnews, {"resize": "zoom"}, r"resize: expected one of 'crop', 'pad', 'stretch'"),
    ],
)
def test_bad_options(loader, kwargs, match, tmp_path):
    with pytest.raises(ValidationError, match=match):  # checked before any file is read
        loader(root=tmp_path, **kwargs)


# ---------------------------------------------------------------------- Wikipedia
def test_wikipedia_counts_and_classes(wiki_all):
    folder = require_data("wikipedia")
    train = load_wikipedia(split="train")
    test = load_wikipedia(split="test")
    assert (len(train), len(test), len(wiki_all)) == (2173, 693, 2866)
    assert wiki_all.class_names == WIKI_NAMES and wiki_all.num_classes == 10
    assert np.bincount(wiki_all.labels.numpy()).tolist() == WIKI_COUNTS
    assert np.bincount(train.labels.numpy()).tolist() == WIKI_TRAIN_COUNTS
    reference = np.load(folder / "derived_labels_train_then_test.npy")
    assert np.array_equal(wiki_all.labels.numpy(), reference)
    assert wiki_all.rows.tolist() == list(range(2866))
    assert test.rows.tolist() == list(range(2173, 2866))
    assert int(train.is_train.sum()) == 2173 and not bool(test.is_train.any())


@pytest.mark.parametrize("text_features, dim", [("minilm384", 384), ("lda10", 10), ("lda50", 50)])
def test_wikipedia_feature_dims(text_features, dim):
    require_data("wikipedia")
    ds = load_wikipedia(split="test", text_features=text_features)
    sample = ds[0]
    assert ds.dims == {"image": 128, "text": dim}
    assert sample["image"].dtype == torch.float32 and sample["text"].shape == (dim,)
    assert set(sample) == {"image", "text", "label", "row", "text_id"}
    assert torch.isfinite(ds.image).all() and torch.isfinite(ds.text).all()


def test_wikipedia_rows_follow_the_list_files(wiki_all):
    scipy_io = pytest.importorskip("scipy.io")
    folder = require_data("wikipedia")
    listed = []
    for name in ("trainset_txt_img_cat.list", "testset_txt_img_cat.list"):
        with open(folder / name, encoding="utf-8") as handle:
            listed += [line.split("\t") for line in handle.read().splitlines() if line]
    assert wiki_all.text_ids == [row[0] for row in listed]
    assert wiki_all.labels.tolist() == [int(row[2]) - 1 for row in listed]
    mat = scipy_io.loadmat(str(folder / "raw_features.mat"))
    assert np.allclose(wiki_all.image.numpy(), np.concatenate([mat["I_tr"], mat["I_te"]]).astype(np.float32))
    lda10 = load_wikipedia(split="all", text_features="lda10")
    assert np.allclose(lda10.text.numpy(), np.concatenate([mat["T_tr"], mat["T_te"]]).astype(np.float32))
    assert torch.allclose(wiki_all.text.norm(dim=1), torch.ones(2866), atol=1e-4)  # MiniLM is L2-normalised


def test_wikipedia_raw_text():
    require_data("wikipedia")
    ds = load_wikipedia(split="test", raw_text=True)
    assert len(ds.captions) == 693 and all(len(c) > 500 for c in ds.captions)
    assert not any("&ndash;" in c or "<text>" in c for c in ds.captions)
    assert ds[5]["caption"] == wikipedia_article(ds[5]["text_id"])
    assert wikipedia_article("00565641497ba8b5495165a47d20a528-2").startswith("Bourdon joined the Val-d'Or")
    with pytest.raises(DataNotFoundError, match=r"texts/no-such-id\.xml.*CMDA_DATA_DIR"):
        wikipedia_article("no-such-id")


# ---------------------------------------------------------------------- Web News
def test_webnews_counts_dims_and_order(webnews_all):
    folder = require_data("webnews")
    with open(folder / "derived_index.tsv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(webnews_all) == len(rows) == 2193
    train, test = load_webnews(split="train"), load_webnews(split="test")
    assert (len(train), len(test)) == (1696, 497)
    assert webnews_all.dims == {"image": 1280, "text": 384}
    assert webnews_all.labels.tolist() == [int(r["label0"]) for r in rows]
    assert webnews_all.text_ids == [r["text_id"] for r in rows]
    assert np.bincount(webnews_all.labels.numpy()).tolist() == WEBNEWS_COUNTS
    assert np.bincount(train.labels.numpy()).tolist() == WEBNEWS_TRAIN_COUNTS
    assert webnews_all.class_names[2] == "economy" and webnews_all.class_names[9] == "sports"
    raw = np.load(folder / "derived_effnet_lite0_img_feat.npy")
    assert np.array_equal(test.image.numpy(), raw[test.rows.numpy()])
    assert torch.allclose(webnews_all.text.norm(dim=1), torch.ones(2193), atol=1e-3)


def test_webnews_captions_are_chinese(webnews_all):
    assert all(c and CJK.search(c) for c in webnews_all.captions)
    sample = webnews_all[0]
    assert sample["caption"] == (require_data("webnews") / "texts" / f"{sample['text_id']}.txt").read_text("utf-8").strip()


def test_webnews_photos_decode():
    require_data("webnews")
    photos = load_webnews(image="pixels", image_size=64, split="test", captions=False)
    assert len(photos) == 497 and "caption" not in photos[0]
    sample = photos[3]
    image = sample["image"]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.02
    assert sample["text"].shape == (384,) and sample["row"] == int(photos.rows[3])
    small = load_webnews(image="pixels", image_size=32, split="test", resize="pad", captions=False)
    assert small[3]["image"].shape == (3, 32, 32)


def test_webnews_photo_with_space_in_name():
    folder = require_data("webnews")
    photos = load_webnews(image="pixels", split="all", captions=False)
    position = photos.text_ids.index("22")
    assert photos.image_paths[position] == "images/culture/22 .jpg"
    assert photos[position]["image"].shape == (3, 64, 64)
    assert (folder / photos.image_paths[position]).is_file()


def test_webnews_cache_pickle_and_loader():
    require_data("webnews")
    photos = load_webnews(image="pixels", image_size=32, split="test", cache=True)
    first = photos[0]["image"]
    assert torch.equal(photos[0]["image"], first)  # from the cache, same values
    restored = pickle.loads(pickle.dumps(photos.subset([0, 1, 2])))
    assert torch.equal(restored[0]["image"], first) and restored.rows.tolist() == photos.rows[:3].tolist()
    batch = next(iter(DataLoader(photos, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4


def test_decode_image_by_hand(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 20:] = (0, 0, 255)
    path = tmp_path / "halves.png"
    image_module.fromarray(pixels).save(path)
    stretch = decode_image(path, 10, "stretch")
    assert stretch[0, :, 0].tolist() == [1.0] * 10 and stretch[2, :, -1].tolist() == [1.0] * 10
    crop = decode_image(path, 10, "crop")  # the centre 20 x 20: half red, half blue
    assert float(crop[0, :, :4].min()) == 1.0 and float(crop[2, :, -4:].min()) == 1.0
    pad = decode_image(path, 10, "pad")  # 10 x 5 picture centred: rows 0-1 and 8-9 black
    assert float(pad[:, :2].abs().max()) == 0.0 and float(pad[:, 3:7].sum(0).min()) > 0.9


# ---------------------------------------------------------------------- splits
def test_wikipedia_normal_classes_are_the_only_921_triple(wiki_all):
    counts = np.bincount(wiki_all.labels.numpy())
    triples = [t for t in itertools.combinations(range(10), 3) if counts[list(t)].sum() == 921]
    assert triples == [WIKIPEDIA_NORMAL_CLASSES] == [(7, 8, 9)]
    assert [wiki_all.class_names[c] for c in WIKIPEDIA_NORMAL_CLASSES] == ["royalty", "sport", "warfare"]


@pytest.mark.parametrize("variant, n_anomaly", [("split", 693 - 216), ("all_abnormal", 1945)])
def test_wikipedia_anomaly_split(wiki_all, variant, n_anomaly):
    labels, is_train = wiki_all.labels, wiki_all.is_train
    parts = anomaly_split(labels, WIKIPEDIA_NORMAL_CLASSES, is_train, variant=variant)
    normal = np.isin(labels.numpy(), WIKIPEDIA_NORMAL_CLASSES)
    assert int(normal.sum()) == 921 and int((~normal).sum()) == 1945
    assert (len(parts["train_normal"]), len(parts["test_normal"])) == (144 + 214 + 347, 41 + 71 + 104)
    assert len(parts["test_anomaly"]) == n_anomaly
    assert not set(parts["train_normal"]) & set(parts["test"])
    assert not set(parts["test_normal"]) & set(parts["test_anomaly"])
    assert normal[parts["train_normal"]].all() and is_train.numpy()[parts["train_normal"]].all()
    assert not normal[parts["test_anomaly"]].any()
    assert parts["test_target"].tolist() == (~normal[parts["test"]]).astype(int).tolist()  # anomaly = 1


def test_webnews_anomaly_split(webnews_all):
    counts = np.bincount(webnews_all.labels.numpy())
    share = counts[list(WEBNEWS_NORMAL_CLASSES)].sum() / counts.sum()
    best = min(itertools.combinations(range(10), 3),
               key=lambda t: abs(counts[list(t)].sum() / counts.sum() - 921 / 2866))
    assert best == WEBNEWS_NORMAL_CLASSES and abs(share - 921 / 2866) < 1e-3
    parts = anomaly_split(webnews_all.labels, WEBNEWS_NORMAL_CLASSES, webnews_all.is_train)
    assert (len(parts["train_normal"]), len(parts["test_normal"])) == (545, 160)
    assert len(parts["test_anomaly"]) == 497 - 160


def test_classification_split(wiki_all):
    parts = classification_split(wiki_all.is_train)
    assert parts["train"].tolist() == list(range(2173)) and parts["test"].tolist() == list(range(2173, 2866))


def test_validation_split_stratified_and_deterministic(wiki_all):
    labels = wiki_all.labels.numpy()
    train_rows = np.arange(2173)
    fit, val = validation_split(train_rows, labels, fraction=0.2, seed=0)
    assert not set(fit) & set(val) and sorted(set(fit) | set(val)) == train_rows.tolist()
    per_class = np.bincount(labels[val], minlength=10)
    assert np.all(np.abs(per_class - 0.2 * np.array(WIKI_TRAIN_COUNTS)) < 1.0)
    assert len(val) == round(0.2 * 2173)
    again = validation_split(train_rows, labels, fraction=0.2, seed=0)[1]
    assert np.array_equal(again, val)
    assert not np.array_equal(validation_split(train_rows, labels, fraction=0.2, seed=1)[1], val)


def test_validation_split_small_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    fit, val = validation_split([0, 1, 2, 3, 4, 5], labels, fraction=0.5, seed=3)
    # class 0: round(1.5) = 2; class 1: 1; class 2 has one row and stays in train
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    assert 5 in fit
    with pytest.raises(ValidationError, match=r"fraction: expected a number in \(0, 1\), got 1.0"):
        validation_split([0, 1], labels, fraction=1.0)
    with pytest.raises(ValidationError, match="indices: expected unique row indices, got 1 duplicates"):
        validation_split([0, 0, 1], labels)
    with pytest.raises(ValidationError, match=r"indices: expected rows in \[0, 6\)"):
        validation_split([0, 9], labels)


def test_anomaly_split_errors():
    labels = torch.tensor([0, 1, 2, 0])
    is_train = torch.tensor([True, False, True, False])
    with pytest.raises(ValidationError, match=r"normal_classes: expected a non-empty list of classes present"):
        anomaly_split(labels, [5], is_train)
    with pytest.raises(ValidationError, match="normal_classes: expected to leave at least one anomaly"):
        anomaly_split(labels, [0, 1, 2], is_train)
    with pytest.raises(ShapeError, match="is_train: expected length 4 to match labels, got length 3"):
        anomaly_split(labels, [0], is_train[:3])
    with pytest.raises(ValidationError, match="is_train: expected a 1-D boolean array"):
        anomaly_split(labels, [0], [1, 0, 1, 0])
    with pytest.raises(ValidationError, match="variant: expected one of 'split', 'all_abnormal'"):
        anomaly_split(labels, [0], is_train, variant="paper")


def test_paired_dataset_subset_keeps_rows(wiki_all):
    sub = wiki_all.subset(np.array([2173, 5]))
    assert isinstance(sub, PairedFeatureDataset)
    assert [s["row"] for s in sub] == [2173, 5]
    assert sub.is_train.tolist() == [False, True]
    assert torch.equal(sub[0]["text"], wiki_all.text[2173])


# ---------------------------------------------------------------------- optional dependencies
def test_import_pulls_in_neither_scipy_nor_pillow():
    code = ("import sys, cmda_data.datasets; "
            "print(sorted(m for m in ('scipy', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_missing_scipy_names_the_extra(monkeypatch):
    require_data("wikipedia")
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `from scipy.io import ...` fail
    with pytest.raises(MissingDependencyError, match=r"scipy: expected .*pip install -e '\.\[bench\]'"):
        load_wikipedia()


def test_missing_pillow_names_the_extra(monkeypatch):
    require_data("webnews")
    photos = load_webnews(image="pixels", split="test", captions=False)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(MissingDependencyError, match=r"Pillow: expected .*pip install -e '\.\[vision\]'"):
        photos[0]
