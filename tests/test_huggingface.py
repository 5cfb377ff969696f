"""Hugging Face ``datasets`` as input: real ``Dataset`` / ``IterableDataset`` objects, offline.

A tiny image folder with a ``metadata.csv`` of captions is written to ``tmp_path`` and read
with ``load_dataset("imagefolder")`` (no network: offline flags and a cache in tmp_path).
References are computed by hand from the same pixels and strings (numpy ``/ 255``, plain
lists), or are the same data given the way that worked before (tensors, lists).
"""

from __future__ import annotations

import os
import string
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cmda_data import CMDACollate, ContrastiveAligner, CrossModalAugmentedDataset, EmbeddingBank, IndexedDataset
from cmda_data.aligners import CLIPAligner
from cmda_data.augment.buffer import CandidateBuffer
from cmda_data.exceptions import CMDAError, FieldError, ShapeError

datasets = pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")

N = 12
COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]


class CharBag(nn.Module):
    """A text encoder: letter counts of each string (a real, deterministic featuriser)."""

    def forward(self, texts):
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"CharBag takes a list of strings, got {type(texts).__name__}")
        out = torch.zeros(len(texts), 26)
        for row, text in enumerate(texts):
            for char in text.lower():
                if char in string.ascii_lowercase:
                    out[row, ord(char) - 97] += 1
        return out


def pixels(i: int) -> np.ndarray:
    """Image i: a 6x6 RGB picture of its class colour with a noise pattern (uint8 HWC)."""
    g = np.random.default_rng(i)
    base = np.array(COLOURS[i % 3], dtype=np.int64)
    return np.clip(base + g.integers(-9, 10, size=(6, 6, 3)), 0, 255).astype(np.uint8)


CAPTIONS = [f"a {['red', 'green', 'blue'][i % 3]} square number {'abcdefghijkl'[i]}" for i in range(N)]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pictures"
    root.mkdir()
    lines = ["file_name,text,label"]
    for i in range(N):
        Image.fromarray(pixels(i)).save(root / f"{i:02d}.png")
        lines.append(f"{i:02d}.png,{CAPTIONS[i]},{i % 3}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def hf(folder, tmp_path):
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train",
                               cache_dir=str(tmp_path / "hf_cache"))
    return ds


def order(ds):
    """Image numbers of ``ds``'s rows (from the captions)."""
    return ["abcdefghijkl".index(t[-1]) for t in ds["text"]]


def aligner():
    torch.manual_seed(0)
    return ContrastiveAligner({"image": nn.Flatten(), "text": CharBag()}, dim=8, head_hidden=(16,), seed=0)


def reference_latents(model, ds):
    """The latents computed by hand: pixels / 255 as [n, 3, 6, 6] floats, captions as a list."""
    images = torch.stack([torch.from_numpy(pixels(i)).permute(2, 0, 1).float() / 255 for i in order(ds)])
    return {"image": model.embed("image", images), "text": model.embed("text", list(ds["text"]))}


def test_import_cmda_data_does_not_import_datasets():
    code = "import sys, cmda_data, cmda_data.bank, cmda_data.aligners; assert 'datasets' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_bank_build_on_an_imagefolder_with_pil_images_and_captions(hf):
    """It failed inside default_collate with a TypeError (PIL images)."""
    model = aligner()
    model.build({"image": torch.zeros(2, 3, 6, 6), "text": ["a", "b"]})
    bank = EmbeddingBank.build(hf, model, student="image", teachers="text", n_components=2, batch_size=5,
                               progress=False)
    want = reference_latents(model, hf)
    for modality in ("image", "text"):
        torch.testing.assert_close(bank.embeddings[modality], want[modality], atol=1e-6, rtol=1e-5)


def test_torch_format_and_streaming_give_the_same_bank(hf):
    model = aligner()
    model.build({"image": torch.zeros(2, 3, 6, 6), "text": ["a", "b"]})
    common = dict(student="image", teachers="text", n_components=2, batch_size=5, progress=False)
    want = EmbeddingBank.build(hf, model, **common).embeddings
    for variant in (hf.with_format("torch"), hf.to_iterable_dataset(), hf.to_iterable_dataset().with_format("torch")):
        got = EmbeddingBank.build(variant, model, **common).embeddings
        for modality in ("image", "text"):
            torch.testing.assert_close(got[modality], want[modality], atol=1e-6, rtol=1e-5)


def test_fit_on_a_dataset_a_stream_and_a_mapping_of_columns(hf):
    """A Column (ds["text"] in datasets >= 4) was refused where a list of strings is accepted."""
    histories = []
    for data in (hf, hf.to_iterable_dataset(), {"image": hf["image"], "text": hf["text"]}):
        model = aligner()
        histories.append(model.fit(data, epochs=3, batch_size=4, shuffle=False, progress=False))
        assert len(histories[-1]) == 3 and all(np.isfinite(histories[-1]))
    # the same batches in the same order: the same training
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-5)
    np.testing.assert_allclose(histories[0], histories[2], rtol=1e-5)
    model = aligner()
    model.fit(hf, epochs=2, batch_size=4, progress=False)
    torch.testing.assert_close(model.embed("text", hf["text"]), model.embed("text", list(hf["text"])))
    torch.testing.assert_close(model.embed("image", hf["image"]), reference_latents(model, hf)["image"],
                               atol=1e-6, rtol=1e-5)


def test_entry_points_on_a_hugging_face_dataset_with_workers(hf):
    model = aligner()
    model.fit(hf, epochs=2, batch_size=4, progress=False)
    bank = EmbeddingBank.build(hf, model, student="image", teachers="text", n_components=2, progress=False)
    common = dict(target="label", num_classes=3, p=1.0, top_k=3, seed=4, pool_size=N)
    want = torch.stack([torch.from_numpy(pixels(i)).permute(2, 0, 1).float() for i in order(hf)])
    collate = CMDACollate(bank, **common)
    batch = next(iter(DataLoader(IndexedDataset(hf), batch_size=N, num_workers=2, collate_fn=collate)))
    weights, partners = batch["mix_info"]["weights"], batch["mix_info"]["partners"]
    expected = (weights[:, :, None, None, None] * want[partners]).sum(1)  # the mix by hand, on the pixels
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (N, 3, 6, 6)
    torch.testing.assert_close(batch["image"], expected, atol=1e-3, rtol=1e-5)
    assert batch["text"] == list(hf["text"]) and batch["label"].shape == (N, 3)
    dataset = CrossModalAugmentedDataset(hf, bank, **common)
    items = next(iter(DataLoader(dataset, batch_size=N, num_workers=2)))
    w, p = items["mix_info"]["weights"], items["mix_info"]["partners"]
    torch.testing.assert_close(items["image"], (w[:, :, None, None, None] * want[p]).sum(1), atol=1e-3, rtol=1e-5)
    stream = hf.to_iterable_dataset().map(lambda row, i: {"index": i}, with_indices=True)
    streamed = next(iter(DataLoader(stream, batch_size=N, collate_fn=collate)))  # the stream in a DataLoader
    torch.testing.assert_close(streamed["image"], batch["image"])
    with pytest.raises(CMDAError, match="map-style"):  # the per-sample dataset needs indices: said so
        CrossModalAugmentedDataset(stream, bank, **common)
    out = list(CandidateBuffer(bank, **common)(iter(stream)))
    assert len(out) == N and all(o["image"].dtype == torch.float32 for o in out)
    for o in out:
        w, p = o["mix_info"]["weights"], o["mix_info"]["partners"]
        torch.testing.assert_close(o["image"], (w[:, None, None, None] * want[p]).sum(0), atol=1e-3, rtol=1e-5)


def test_dataset_from_dict_and_images_that_cannot_be_stacked(tmp_path):
    images = [Image.fromarray(pixels(i)) for i in range(4)] + [Image.fromarray(np.zeros((5, 6, 3), np.uint8))]
    ds = datasets.Dataset.from_dict({"image": images, "text": CAPTIONS[:5]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    model = aligner()
    with pytest.raises(ShapeError, match="images of one size"):  # a CMDAError naming the fix, not a TypeError
        EmbeddingBank.build(ds, model, student="image", teachers="text", progress=False)
    with pytest.raises(FieldError, match="field 'image' of the batch") as info:
        EmbeddingBank.build(ds.with_format("torch"), model, student="image", teachers="text", progress=False)
    assert "resize" in str(info.value)
    with pytest.raises(FieldError, match="a column of the dataset"):
        EmbeddingBank.build(ds, model, student="image", teachers="text", fields={"text": "caption"}, progress=False)
    with pytest.raises(CMDAError, match="indices"):
        EmbeddingBank.build(ds.to_iterable_dataset(), model, student="image", teachers="text", indices=[0, 1],
                            progress=False)


class Objects(Dataset):
    """Samples whose text field holds an object default_collate cannot stack."""

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"image": torch.zeros(3, 6, 6), "text": object()}


def test_values_that_cannot_be_collated_raise_a_field_error():
    with pytest.raises(FieldError, match="field 'text' of the batch: expected tensors, numbers"):
        EmbeddingBank.build(Objects(), aligner(), student="image", teachers="text", progress=False)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=48, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8),
        projection_dim=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.CLIPModel(config)
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 16},
                                                        crop_size={"height": 16, "width": 16}),
        tokenizer=transformers.CLIPTokenizer(vocab=vocab, merges=[]))
    folder = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return CLIPAligner.from_pretrained(folder)


def test_clip_takes_columns_and_preprocesses_images_of_any_size_with_its_processor(clip, hf):
    """CLIP's text path refused a Column; images of different sizes go through its own processor."""
    images = [Image.fromarray(pixels(i)) for i in range(3)] + [Image.fromarray(np.zeros((9, 20, 3), np.uint8))]
    ds = datasets.Dataset.from_dict({"image": images, "text": CAPTIONS[:4]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    want_image = clip.image_processor(images=list(ds["image"]), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(clip.embed("image", ds["image"]), clip.embed("image", want_image))
    torch.testing.assert_close(clip.embed("text", ds["text"]), clip.embed("text", CAPTIONS[:4]))
    bank = EmbeddingBank.build(ds, clip, student="image", teachers="text", fit_gmm=False,
                               batch_size=3, progress=False)
    torch.testing.assert_close(bank.embeddings["image"], clip.embed("image", want_image), atol=1e-5, rtol=1e-4)
