"""ShapesDataset: determinism, captions agree with pixels, bag-of-words vectors."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cmda_data.datasets import ShapesDataset, caption_embedding
from cmda_data.datasets.shapes import COLOURS, POSITIONS, SHAPES, VOCABULARY
from cmda_data.exceptions import CMDAError, ValidationError

# Area of each shape in units of (half-size)^2, computed by hand from the definitions:
# circle pi; square (2*0.82)^2; triangle base 2 (|dx| <= (0.8+1)/1.8 = 1) x height 1.8 / 2;
# cross two 0.6 x 2 bars minus the 0.6 x 0.6 overlap; diamond 2 * 1.1^2; ring pi (1 - 0.55^2).
HAND_AREAS = {
    "circle": math.pi,
    "square": 1.64 ** 2,
    "triangle": 2.0 * 1.8 / 2.0,
    "cross": 2 * (0.6 * 2.0) - 0.36,
    "diamond": 2 * 1.1 ** 2,
    "ring": math.pi * (1 - 0.55 ** 2),
}


@pytest.fixture(scope="module")
def shapes() -> ShapesDataset:
    return ShapesDataset(n=2000, image_size=32, seed=0)


def _colour_hits(ds: ShapesDataset, tolerance: float = 0.08) -> torch.Tensor:
    """[n, C, H, W] bool: pixel within ``tolerance`` (every channel) of palette colour C."""
    palette = torch.tensor(list(COLOURS.values()))
    distance = (ds.images[:, None] - palette[None, :, :, None, None]).abs().amax(dim=2)
    return distance <= tolerance


# ---------------------------------------------------------------------- determinism
def test_same_seed_same_data(shapes):
    again = ShapesDataset(n=2000, image_size=32, seed=0)
    assert torch.equal(again.images, shapes.images)
    assert torch.equal(again.texts, shapes.texts)
    assert again.captions == shapes.captions
    assert torch.equal(again.labels, shapes.labels)


def test_different_seed_different_data(shapes):
    other = ShapesDataset(n=2000, image_size=32, seed=1)
    assert not torch.equal(other.images, shapes.images)
    assert other.captions != shapes.captions


def test_global_rng_untouched():
    torch_state = torch.random.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()
    ShapesDataset(n=50, image_size=16, seed=3)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    torch.manual_seed(999)  # the global seed must not matter
    a = ShapesDataset(n=50, image_size=16, seed=3)
    torch.manual_seed(1)
    b = ShapesDataset(n=50, image_size=16, seed=3)
    assert torch.equal(a.images, b.images)


def test_fast_generation():
    start = time.perf_counter()
    ShapesDataset(n=2000, image_size=32, seed=5)
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------------- samples
def test_sample_format(shapes):
    sample = shapes[7]
    assert set(sample) == {"image", "caption", "text", "label", "colour", "shape", "position"}
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["text"].shape == (len(VOCABULARY),) and sample["text"].dtype == torch.float32
    assert isinstance(sample["label"], int)
    assert shapes.images.min() >= 0.0 and shapes.images.max() <= 1.0
    assert shapes[-1]["caption"] == shapes.captions[-1]
    with pytest.raises(IndexError):
        shapes[2000]
    assert shapes.num_classes == len(SHAPES) == 6


def test_caption_matches_attributes(shapes):
    for i in range(0, 2000, 7):
        s = shapes[i]
        assert s["caption"] == f"a {s['colour']} {s['shape']} at the {s['position']}"
        assert shapes.classes[s["label"]] == s["shape"]
        assert s["colour"] in COLOURS and s["position"] in POSITIONS


def test_classes_balanced(shapes):
    counts = torch.bincount(shapes.labels, minlength=6)
    assert counts.max() - counts.min() <= 1


def test_named_colour_is_the_dominant_shape_colour(shapes):
    hits = _colour_hits(shapes)  # [n, C, H, W]
    counts = hits.sum(dim=(2, 3))  # pixels of each palette colour
    assert torch.equal(counts.argmax(dim=1), shapes.colour_labels)
    own = counts.gather(1, shapes.colour_labels[:, None]).squeeze(1)
    assert int(own.min()) >= 15  # the smallest shape (ring, r ~ 3.5 px) still has ~27 px


def test_named_position_holds_the_shape(shapes):
    hits = _colour_hits(shapes)
    mask = hits[torch.arange(len(shapes)), shapes.colour_labels].float()  # [n, H, W]
    grid = torch.arange(32, dtype=torch.float32) + 0.5
    total = mask.sum(dim=(1, 2))
    row = (mask.sum(dim=2) * grid).sum(dim=1) / total
    col = (mask.sum(dim=1) * grid).sum(dim=1) / total
    vertical = (row >= 16).long()
    horizontal = (col // (32 / 3)).long().clamp(max=2)
    assert torch.equal(vertical * 3 + horizontal, shapes.position_labels)


def test_shape_areas_match_hand_computed(shapes):
    hits = _colour_hits(shapes)
    area = hits[torch.arange(len(shapes)), shapes.colour_labels].sum(dim=(1, 2)).float()
    relative = area / shapes.radii ** 2
    for k, name in enumerate(SHAPES):
        mean = float(relative[shapes.labels == k].mean())
        assert mean == pytest.approx(HAND_AREAS[name], rel=0.03), name


def test_ring_has_a_hole_and_others_do_not(shapes):
    centre = shapes.centres.floor().long().clamp(0, 31)
    n = torch.arange(len(shapes))
    centre_pixel = shapes.images[n, :, centre[:, 0], centre[:, 1]]  # [n, 3]
    palette = torch.tensor(list(COLOURS.values()))
    filled = (centre_pixel - palette[shapes.colour_labels]).abs().amax(dim=1) <= 0.08
    is_ring = shapes.labels == SHAPES.index("ring")
    assert bool(filled[~is_ring].all())
    assert not bool(filled[is_ring].any())


def test_plain_and_noisy_backgrounds():
    plain = ShapesDataset(n=40, image_size=32, seed=2, background="plain")
    noisy = ShapesDataset(n=40, image_size=32, seed=2, background="noisy")
    # the shapes never reach the corners: a 4 x 4 corner patch is pure background
    assert float(plain.images[:, :, :4, :4].std(dim=(2, 3)).max()) == 0.0
    assert float(noisy.images[:, :, :4, :4].std(dim=(2, 3)).min()) > 0.01
    mixed = ShapesDataset(n=400, image_size=32, seed=2)
    assert 100 < int(mixed.noisy.sum()) < 300


# ---------------------------------------------------------------------- bag of words
def test_bag_of_words_equals_caption_embedding(shapes):
    expected = torch.stack([caption_embedding(c) for c in shapes.captions])
    assert torch.equal(shapes.texts, expected)
    assert torch.allclose(shapes.texts.norm(dim=1), torch.ones(len(shapes)))


def test_caption_embedding_by_hand():
    v = caption_embedding("a blue ring at the bottom centre")
    expected = torch.zeros(len(VOCABULARY))
    for word in ("blue", "ring", "bottom", "centre"):
        expected[VOCABULARY.index(word)] = 0.5
    assert torch.equal(v, expected)
    assert torch.equal(caption_embedding("nothing known here"), torch.zeros(len(VOCABULARY)))
    assert caption_embedding("red red").tolist()[VOCABULARY.index("red")] == 1.0
    with pytest.raises(ValidationError, match="caption: expected a string"):
        caption_embedding(3)


def test_same_caption_same_vector_different_caption_orthogonal_parts(shapes):
    same = [i for i in range(len(shapes)) if shapes.captions[i] == shapes.captions[0]]
    assert all(torch.equal(shapes.texts[i], shapes.texts[0]) for i in same)
    cos = shapes.texts @ shapes.texts.T
    assert float(cos.min()) >= 0.0 and float(cos.max()) <= 1.0 + 1e-6


# ---------------------------------------------------------------------- loaders, splits, errors
def test_default_collate_batches(shapes):
    batch = next(iter(DataLoader(shapes, batch_size=5)))
    assert batch["image"].shape == (5, 3, 32, 32)
    assert batch["text"].shape == (5, len(VOCABULARY))
    assert batch["label"].tolist() == shapes.labels[:5].tolist()
    assert batch["caption"] == shapes.captions[:5]


def test_train_test_split(shapes):
    train, test = shapes.train_test_split(0.2, seed=0)
    assert len(train) + len(test) == 2000
    assert not set(train.indices) & set(test.indices)
    test_counts = torch.bincount(shapes.labels[test.indices], minlength=6)
    assert all(abs(int(c) - 0.2 * 333.5) <= 1.5 for c in test_counts)
    again = shapes.train_test_split(0.2, seed=0)[1]
    assert again.indices == test.indices
    assert shapes.train_test_split(0.2, seed=1)[1].indices != test.indices


def test_features(shapes):
    assert shapes.features("image") is shapes.images
    assert shapes.features("text") is shapes.texts
    with pytest.raises(ValidationError, match="modality: expected one of 'image', 'text'"):
        shapes.features("audio")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, r"n: expected an integer >= 1, got 0"),
        ({"image_size": 4}, r"image_size: expected an integer >= 8, got 4"),
        ({"seed": 1.5}, r"seed: expected an integer, got 1.5"),
        ({"background": "stripes"}, r"background: expected one of 'mixed', 'plain', 'noisy'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValidationError, match=match) as info:
        ShapesDataset(**kwargs)
    assert isinstance(info.value, (CMDAError, ValueError))
