"""Images as they come: uint8 (and declared integer) pixels are students through every entry point.

The reference is the same pipeline on the same pixels already converted to float32 by hand
(``images.float()``, or ``images.float() / 255`` with ``ImageField(..., scale=True)``): the
integer path must give exactly those samples, as float32, through the dataset (item by item and
batched), the collate (with and without DataLoader workers), the module and the stream buffer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _entry_data import NUM_CLASSES, make_bank
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from cmda_data import CMDACollate, CMDAugment, CrossModalAugmentedDataset, IndexedDataset
from cmda_data.augment.buffer import CandidateBuffer
from cmda_data.core._fields import ImageField, as_student, pil_to_tensor
from cmda_data.exceptions import CMDAError, FieldError
from cmda_data.options import MixOptions

N = 20


class PixelDataset(Dataset):
    """``N`` dict samples whose ``image`` is a ``[3, 4, 4]`` tensor of ``dtype`` (values 0..255), or PIL."""

    def __init__(self, dtype=torch.uint8, as_pil: bool = False, seed: int = 2) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.randint(0, 256, (N, 3, 4, 4), generator=g, dtype=torch.int64)
        self.dtype, self.as_pil = dtype, as_pil
        self.labels = [i % NUM_CLASSES for i in range(N)]

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        image = self.pixels[i].to(self.dtype) if self.dtype is not None else self.pixels[i]
        if self.as_pil:
            image = Image.fromarray(self.pixels[i].permute(1, 2, 0).numpy().astype(np.uint8))
        return {"image": image, "text": torch.zeros(2), "label": self.labels[i]}


class FloatView(Dataset):
    """The reference: the same samples with the pixels converted to float32 by hand (``/ divide``)."""

    def __init__(self, inner: PixelDataset, divide: float = 1.0) -> None:
        self.inner, self.divide = inner, divide

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.inner[i])
        sample["image"] = self.inner.pixels[i].float() / self.divide
        return sample


def four_ways(data, fields=None, *, workers: int = 0, **config):
    """The student batch [N, ...] through the dataset (items, batch), the collate, the module and the buffer."""
    bank = make_bank(N)
    options = MixOptions(seed=13, pool_size=N, **{"top_k": 4, "p": 0.7, **config})
    common = dict(target="label", num_classes=NUM_CLASSES, fields=fields)
    dataset = CrossModalAugmentedDataset(data, bank, options, **common)
    collate = CMDACollate(bank, options, **common)
    module = CMDAugment(bank, options, **common)
    buffer = CandidateBuffer(bank, options, **common)
    samples = [IndexedDataset(data)[i] for i in range(N)]
    out = {
        "dataset": default_collate([dataset[i] for i in range(len(dataset))]),
        "dataset-batch": default_collate(dataset.__getitems__(list(range(len(dataset))))),
        "collate": next(iter(DataLoader(IndexedDataset(data), batch_size=N, collate_fn=collate,
                                        num_workers=workers))),
    }
    if not isinstance(samples[0]["image"], Image.Image):
        out["module"] = module(default_collate(samples))[0]
        out["buffer-last"] = list(buffer(iter(samples)))[-1]
    return out


def test_uint8_gives_the_float_pipeline_on_the_same_pixels_through_every_entry_point():
    data = PixelDataset(torch.uint8)
    got, want = four_ways(data), four_ways(FloatView(data))
    assert int(got["collate"]["mix_info"]["mixed"].sum()) > 0
    for name in ("dataset", "dataset-batch", "collate", "module"):
        image = got[name]["image"]
        assert image.dtype == torch.float32, name
        torch.testing.assert_close(image, want[name]["image"], atol=1e-4, rtol=1e-6, msg=name)
        assert torch.equal(got[name]["mix_info"]["partners"], want[name]["mix_info"]["partners"]), name
        assert float(image.min()) >= 0.0 and float(image.max()) <= 255.0, name  # convex combinations
    torch.testing.assert_close(got["buffer-last"]["image"], want["buffer-last"]["image"])
    # the rows that are not mixed are the pixels themselves, as float32 in [0, 255]
    keep = ~got["collate"]["mix_info"]["mixed"]
    assert torch.equal(got["collate"]["image"][keep], data.pixels[keep].float())


def test_scale_true_divides_by_255_through_every_entry_point():
    data = PixelDataset(torch.uint8)
    got = four_ways(data, fields={"image": ImageField("image", scale=True)})
    want = four_ways(FloatView(data, 255.0))
    for name in ("dataset", "dataset-batch", "collate", "module"):
        torch.testing.assert_close(got[name]["image"], want[name]["image"], atol=1e-6, rtol=1e-5, msg=name)
        assert float(got[name]["image"].max()) <= 1.0
    torch.testing.assert_close(got["buffer-last"]["image"], want["buffer-last"]["image"])


def test_declared_int16_images_are_mixed_and_scaled_by_the_dtype_maximum():
    data = PixelDataset(torch.int16)
    got = four_ways(data, fields={"image": ImageField("image", scale=True)})
    want = four_ways(FloatView(data, 32767.0))
    for name in ("dataset", "collate", "module"):
        torch.testing.assert_close(got[name]["image"], want[name]["image"], atol=1e-7, rtol=1e-5, msg=name)
    got = four_ways(data, fields={"image": ImageField("image", scale=True, max_value=255)})
    torch.testing.assert_close(got["collate"]["image"], four_ways(FloatView(data, 255.0))["collate"]["image"])


def test_keep_real_returns_the_real_rows_as_float32_too():
    data = PixelDataset(torch.uint8)
    got = four_ways(data, keep_real=True, p=1.0)
    for name in ("collate", "module"):
        image = got[name]["image"]
        assert image.dtype == torch.float32 and image.shape[0] == 2 * N
        assert torch.equal(image[:N], data.pixels.float())
    items = got["dataset"]["image"]
    assert items.dtype == torch.float32 and torch.equal(items[:N], data.pixels.float())


def test_uint8_batches_through_dataloader_workers():
    data = PixelDataset(torch.uint8)
    got = four_ways(data, workers=2)["collate"]
    want = four_ways(FloatView(data))["collate"]
    torch.testing.assert_close(got["image"], want["image"], atol=1e-4, rtol=1e-6)


def test_pil_images_are_students_of_the_dataset_and_the_collate():
    data = PixelDataset(as_pil=True)
    got, want = four_ways(data), four_ways(FloatView(data))
    for name in ("dataset", "dataset-batch", "collate"):
        torch.testing.assert_close(got[name]["image"], want[name]["image"], atol=1e-4, rtol=1e-6, msg=name)


def test_pil_to_tensor_matches_the_pixels_for_rgb_gray_and_16_bit():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert torch.equal(pil_to_tensor(Image.fromarray(rgb)), torch.from_numpy(rgb).permute(2, 0, 1))
    gray = np.array([[0, 7], [200, 255]], dtype=np.uint8)
    assert torch.equal(pil_to_tensor(Image.fromarray(gray)), torch.from_numpy(gray)[None])
    deep = np.array([[0, 40000]], dtype=np.uint16)
    out = pil_to_tensor(Image.fromarray(deep))
    assert out.shape == (1, 1, 2) and out.tolist() == [[[0, 40000]]]
    assert as_student(Image.fromarray(gray), "image", 0).tolist() == [[[0.0, 7.0], [200.0, 255.0]]]


def test_the_token_ids_hint_only_for_token_dtypes():
    bank = make_bank(N)
    collate = CMDACollate(bank, target="label", num_classes=NUM_CLASSES)
    for dtype in (torch.int64, torch.int32):
        samples = [IndexedDataset(PixelDataset(dtype))[i] for i in range(4)]
        with pytest.raises(FieldError, match="token ids") as info:
            collate(samples)
        assert "ImageField('image')" in str(info.value)  # the way out for pixels stored as int64
    samples = [IndexedDataset(PixelDataset(torch.int16))[i] for i in range(4)]
    with pytest.raises(FieldError, match=r"ImageField\('image'\)") as info:
        collate(samples)
    assert "token" not in str(info.value)
    with pytest.raises(FieldError, match="field 'image' of sample 3") as info:  # the dataset names the sample
        CrossModalAugmentedDataset(PixelDataset(torch.int16), bank, target="label", num_classes=NUM_CLASSES)[3]
    assert "token" not in str(info.value)
    with pytest.raises(FieldError, match="token ids"):
        CMDAugment(bank)({"image": torch.ones(4, 3, dtype=torch.long), "index": torch.arange(4)})
    bools = {"image": torch.ones(4, 3, dtype=torch.bool), "index": torch.arange(4)}
    with pytest.raises(FieldError, match="floating-point"):
        CMDAugment(bank)(bools)


def test_image_field_checks_its_arguments():
    for bad in (dict(key=""), dict(key="x", scale=1), dict(key="x", max_value=0), dict(key="x", max_value=np.inf)):
        with pytest.raises(CMDAError):
            ImageField(**bad)
