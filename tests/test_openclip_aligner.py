"""OpenCLIPAligner on a tiny random open_clip model built from a config in the test (no network)."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CPU_AND_CUDA, REPO_ROOT
from torch.utils.data import DataLoader

from cmda_data import CMDACollate, EmbeddingBank, IndexedDataset
from cmda_data.aligners import Aligner, OpenCLIPAligner, create_aligner, list_aligners, load_aligner
from cmda_data.datasets import ShapesDataset
from cmda_data.exceptions import MissingDependencyError, ShapeError, ValidationError

#: a ViT with one layer of width 32 on 32 px images and a one-layer text tower with the
#: vocabulary of open_clip's default tokenizer (bundled with open_clip: nothing to download)
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TEXTS = ["a cat", "a dog on a mat", "birds", "the quick brown fox jumps over the lazy dog again and again", "z"]


def test_import_does_not_pull_in_open_clip():
    code = ("import sys, cmda_data, cmda_data.aligners; "
            "from cmda_data.aligners import OpenCLIPAligner, create_aligner; "
            "assert 'open_clip' not in sys.modules, 'open_clip imported'")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_missing_open_clip_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[openclip\]'"):
        OpenCLIPAligner.from_pretrained("ViT-B-32")
    with pytest.raises(ImportError, match=r"OpenCLIPAligner: expected the optional package 'open_clip_torch'"):
        OpenCLIPAligner(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tiny(open_clip):
    with torch.random.fork_rng():
        torch.manual_seed(0)  # open_clip initialises from the global generator
        return OpenCLIPAligner.from_pretrained("cmda-tiny", model_cfg=TINY_CFG)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("tiny_openclip") / "saved")


def _uint8_images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 40 + 3 * k, 36, generator=g) * 255).to(torch.uint8) for k in range(n)]


def _pil(images):
    Image = pytest.importorskip("PIL.Image")
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]


def test_shapes_norms_and_protocol(tiny):
    assert tiny.modalities == ("image", "text") and tiny.dim == 16 and tiny.context_length == 16
    z_img = tiny.embed("image", torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    z_txt = tiny.embed("text", TEXTS)
    assert z_img.shape == (3, 16) and z_txt.shape == (5, 16)
    torch.testing.assert_close(z_img.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(z_txt.norm(dim=1), torch.ones(5))
    assert not z_img.requires_grad and not z_txt.requires_grad
    assert tiny.embed("text", "a cat").shape == (1, 16)
    assert torch.isfinite(z_img).all() and torch.isfinite(z_txt).all()
    assert not torch.allclose(z_txt[0], z_txt[1])  # different captions, different latents
    assert "openclip" in list_aligners()


def test_matches_open_clip_loading_the_saved_folder_itself(tiny, saved, open_clip):
    # the reference is open_clip's own loader, tokenizer and transform reading our folder
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{saved}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{saved}")
    model.eval()
    images = _pil(_uint8_images())
    with torch.no_grad():
        ref_txt = model.encode_text(tokenizer(TEXTS), normalize=True)
        ref_img = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
    torch.testing.assert_close(tiny.embed("text", TEXTS), ref_txt, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny.embed("image", images), ref_img, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny.embed("text", tokenizer(TEXTS)), ref_txt, atol=1e-6, rtol=0)  # token ids


def test_pil_uint8_tensor_and_numpy_images_agree(tiny):
    images = _uint8_images()
    from_pil = tiny.embed("image", _pil(images))
    torch.testing.assert_close(tiny.embed("image", images), from_pil, atol=0, rtol=0)
    torch.testing.assert_close(tiny.embed("image", [im.permute(1, 2, 0).numpy() for im in images]), from_pil,
                               atol=0, rtol=0)
    same_size = [im[:, :32, :32] for im in images]  # a stacked uint8 batch, as default_collate gives
    torch.testing.assert_close(tiny.embed("image", torch.stack(same_size)), tiny.embed("image", same_size),
                               atol=0, rtol=0)
    pixels = torch.stack([tiny.preprocess_image(im) for im in _pil(images)])
    assert pixels.shape == (4, 3, 32, 32) and pixels.dtype == torch.float32
    torch.testing.assert_close(tiny.embed("image", pixels), from_pil, atol=1e-6, rtol=0)


def test_batching_invariant_and_deterministic(tiny):
    images = _pil(_uint8_images())
    whole = tiny.embed("image", images)
    torch.testing.assert_close(torch.cat([tiny.embed("image", [im]) for im in images]), whole, atol=1e-5, rtol=0)
    texts = tiny.embed("text", TEXTS)
    torch.testing.assert_close(tiny.embed("text", TEXTS), texts, atol=0, rtol=0)
    torch.testing.assert_close(torch.cat([tiny.embed("text", t) for t in TEXTS]), texts, atol=1e-5, rtol=0)


def test_forward_has_grad_and_embed_restores_mode(tiny):
    tiny.train()
    try:
        assert tiny("text", TEXTS[:2]).requires_grad
        tiny.embed("image", torch.rand(1, 3, 32, 32))
        assert tiny.training and tiny.model.training and tiny.model.visual.training
    finally:
        tiny.eval()


def test_save_load_gives_identical_embeddings(tiny, saved):
    assert {p.name for p in saved.iterdir()} == {"config.json", "model.safetensors", "open_clip_config.json"}
    config = json.loads((saved / "config.json").read_text())
    assert config["aligner"] == "openclip" and config["model_name"] == "cmda-tiny"
    assert config["model_cfg"] == TINY_CFG
    images, pixels = _pil(_uint8_images()), torch.rand(2, 3, 32, 32)
    for loaded in (OpenCLIPAligner.load(saved), Aligner.load(saved), load_aligner(saved),
                   OpenCLIPAligner.from_pretrained(f"local-dir:{saved}")):
        assert isinstance(loaded, OpenCLIPAligner) and not loaded.training and loaded.dim == 16
        for modality, batch in (("text", TEXTS), ("image", images), ("image", pixels)):
            torch.testing.assert_close(loaded.embed(modality, batch), tiny.embed(modality, batch), atol=0, rtol=0)


def test_load_never_unpickles(saved, monkeypatch):
    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called")
        return call

    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    for loaded in (load_aligner(saved), OpenCLIPAligner.from_pretrained(f"local-dir:{saved}")):
        assert loaded.embed("text", "a cat").shape == (1, 16)
    assert calls == []


@pytest.fixture()
def tiny_tags(open_clip, saved, tmp_path, monkeypatch):
    """A model name and pretrained tags registered with open_clip, as a release would ship them."""
    (tmp_path / "cmda-tiny-reg.json").write_text(json.dumps(TINY_CFG))
    for name in ("_MODEL_CONFIG_PATHS", "_MODEL_CONFIGS"):  # open_clip's registry is restored afterwards
        monkeypatch.setattr(open_clip.factory, name, copy.copy(getattr(open_clip.factory, name)))
    open_clip.add_model_config(tmp_path / "cmda-tiny-reg.json")  # open_clip's public way to add a model
    torch.save({"x": torch.ones(1)}, tmp_path / "weights.pt")
    tags = {
        "cmda": {"file": str(saved / "model.safetensors"), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                 "interpolation": "bilinear"},
        "pickled": {"file": str(tmp_path / "weights.pt")},
        "url_only": {"url": "https://example.invalid/weights.pt", "hf_hub": ""},
        "quick": {"file": str(saved / "model.safetensors"), "quick_gelu": True},
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "cmda-tiny-reg", tags)
    return tmp_path


def test_pretrained_tag_resolves_offline(tiny, saved, tiny_tags, monkeypatch):
    tagged = OpenCLIPAligner.from_pretrained("cmda-tiny-reg", "cmda")
    torch.testing.assert_close(tagged.embed("text", TEXTS), tiny.embed("text", TEXTS), atol=0, rtol=0)
    pixels = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(tagged.embed("image", pixels), tiny.embed("image", pixels), atol=0, rtol=0)
    cfg = tagged.get_config()["preprocess_cfg"]  # the tag's preprocessing is used, and saved
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["interpolation"] == "bilinear" and cfg["size"] == [32, 32]
    gray = _pil([torch.full((3, 32, 32), 128, dtype=torch.uint8)])
    expected = (128 / 255 - 0.5) / 0.25
    torch.testing.assert_close(tagged.preprocess_image(gray[0]), torch.full((3, 32, 32), expected))
    assert OpenCLIPAligner.from_pretrained("cmda-tiny-reg", "quick").model_cfg["quick_gelu"] is True
    # a local checkpoint file instead of a tag
    local = OpenCLIPAligner.from_pretrained("cmda-tiny-reg", str(saved / "model.safetensors"))
    torch.testing.assert_close(local.embed("text", TEXTS), tiny.embed("text", TEXTS), atol=0, rtol=0)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ValidationError, match=r"pretrained: expected a \.safetensors checkpoint .*weights\.pt"):
        OpenCLIPAligner.from_pretrained("cmda-tiny-reg", "pickled")
    with pytest.raises(ValidationError, match=r"pretrained: expected a \.safetensors checkpoint"):
        OpenCLIPAligner.from_pretrained("cmda-tiny-reg", str(tiny_tags / "weights.pt"))
    with pytest.raises(ValidationError, match=r"pretrained: expected a tag whose weights are on the Hugging Face"):
        OpenCLIPAligner.from_pretrained("cmda-tiny-reg", "url_only")
    with pytest.raises(ValidationError, match=r"pretrained: expected a pretrained tag of 'cmda-tiny-reg' \(cmda, "
                                              r"pickled, url_only, quick\)"):
        OpenCLIPAligner.from_pretrained("cmda-tiny-reg", "laion9000")


@pytest.fixture()
def hub_cache(saved, tmp_path, monkeypatch):
    """An offline Hugging Face cache holding a repository 'cmda/tiny-openclip' (what a download leaves)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--cmda--tiny-openclip"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_config.json").write_text((saved / "open_clip_config.json").read_text())
    (snapshot / "open_clip_model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    return tmp_path


def test_hf_hub_name_and_hub_tag_from_the_cache(tiny, hub_cache, open_clip, tiny_tags, monkeypatch):
    hub = OpenCLIPAligner.from_pretrained("hf-hub:cmda/tiny-openclip", cache_dir=str(hub_cache))
    torch.testing.assert_close(hub.embed("text", TEXTS), tiny.embed("text", TEXTS), atol=0, rtol=0)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED["cmda-tiny-reg"], "hub", {"hf_hub": "cmda/tiny-openclip/"})
    tagged = OpenCLIPAligner.from_pretrained("cmda-tiny-reg", "hub", cache_dir=str(hub_cache))
    torch.testing.assert_close(tagged.embed("text", TEXTS), tiny.embed("text", TEXTS), atol=0, rtol=0)
    with pytest.raises(ValidationError, match=r"model_name: expected the config cmda/missing/open_clip_config.json "
                                              r"\(downloaded, or cached"):
        OpenCLIPAligner.from_pretrained("hf-hub:cmda/missing", cache_dir=str(hub_cache))


def test_bad_inputs(tiny, saved, tmp_path):
    with pytest.raises(ValidationError, match=r"modality: expected one of 'image', 'text', got 'audio'"):
        tiny.embed("audio", TEXTS)
    with pytest.raises(ShapeError, match=r"image batch: expected float pixel values of shape \[n, 3, H, W\]"):
        tiny.embed("image", torch.rand(3, 32, 32))
    with pytest.raises(ShapeError, match=r"image batch: expected at least one image"):
        tiny.embed("image", torch.rand(0, 3, 32, 32))
    with pytest.raises(ValidationError, match=r"image batch: expected finite pixel values, got NaN or Inf"):
        tiny.embed("image", torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ValidationError, match=r"image batch: expected float pixel values \[n, 3, H, W\], PIL images, "
                                              r"or uint8"):
        tiny.embed("image", [np.zeros((32, 32, 3), dtype=np.float64)])
    with pytest.raises(ValidationError, match=r"image batch: expected at least one image"):
        tiny.embed("image", [])
    with pytest.raises(ValidationError, match=r"text batch: expected a string or a non-empty sequence of strings"):
        tiny.embed("text", [1, 2])
    with pytest.raises(ValidationError, match=r"text batch: expected a string or a non-empty sequence of strings"):
        tiny.embed("text", [])
    with pytest.raises(ShapeError, match=r"text batch: expected strings or integer token ids of shape"):
        tiny.embed("text", torch.rand(2, 16))
    with pytest.raises(ValidationError, match=r"model: expected an open_clip model"):
        OpenCLIPAligner(torch.nn.Linear(2, 2))
    with pytest.raises(ValidationError, match=r"model_name: expected one of the \d+ open_clip model names"):
        OpenCLIPAligner.from_pretrained("no-such-model")
    with pytest.raises(ValidationError, match=r"pretrained: expected None with local-dir:"):
        OpenCLIPAligner.from_pretrained(f"local-dir:{saved}", "openai")
    with pytest.raises(ValidationError, match=r"model_name: expected 'local-dir:' and a folder containing "
                                              r"open_clip_config.json"):
        OpenCLIPAligner.from_pretrained(f"local-dir:{tmp_path}")
    with pytest.raises(ValidationError, match=r"model_cfg: expected an open_clip model config"):
        OpenCLIPAligner.from_pretrained("mine", model_cfg={"embed_dim": 16})
    with pytest.raises(ValidationError, match=r"model_cfg: expected a config open_clip can build"):
        OpenCLIPAligner.from_pretrained("mine", model_cfg={**TINY_CFG, "vision_cfg": {"bogus": 1}})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "open_clip_config.json").write_text((saved / "open_clip_config.json").read_text())
    (pickled / "open_clip_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValidationError, match=r"model_name: expected a folder with open_clip_config.json and weights "
                                              r"in a \.safetensors file \(cmda_data never unpickles"):
        OpenCLIPAligner.from_pretrained(f"local-dir:{pickled}")
    bare = OpenCLIPAligner(tiny.model)  # no config: dim from a dry run, but it cannot be saved
    assert bare.dim == 16
    torch.testing.assert_close(bare.embed("text", TEXTS), tiny.embed("text", TEXTS), atol=0, rtol=0)
    with pytest.raises(ValidationError, match=r"OpenCLIPAligner.save: expected an aligner that knows its open_clip "
                                              r"model config"):
        bare.save(tmp_path / "bare")
    with pytest.raises(ValidationError, match=r"create_aligner\('openclip'\): expected model_name="):
        create_aligner("openclip")


def test_registry(tiny):
    by_name = create_aligner("openclip", model_name="cmda-tiny", model_cfg=TINY_CFG)
    assert isinstance(by_name, OpenCLIPAligner) and by_name.dim == 16
    wrapped = create_aligner("openclip", model=tiny.model, model_name="cmda-tiny", model_cfg=TINY_CFG)
    torch.testing.assert_close(wrapped.embed("text", TEXTS), tiny.embed("text", TEXTS), atol=0, rtol=0)


def test_a_bank_built_with_it_mixes_in_cmda_collate(tiny):
    data = ShapesDataset(n=24, image_size=32)
    bank = EmbeddingBank.build(data, tiny, student="image", teachers="text",
                               fields={"image": "image", "text": "caption"}, batch_size=10, n_components=2,
                               progress=False)
    # the bank holds exactly what the aligner gives for the samples
    direct = tiny.embed("text", [data[i]["caption"] for i in range(len(data))])
    torch.testing.assert_close(bank.embeddings["text"], direct, atol=1e-5, rtol=0)
    collate = CMDACollate(bank, target="label", num_classes=data.num_classes, top_k=4, p=1.0)
    loader = DataLoader(IndexedDataset(data), batch_size=8, shuffle=False, collate_fn=collate, num_workers=2)
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (8, 3, 32, 32) and batch["label"].shape == (8, data.num_classes)
        assert torch.isfinite(batch["image"]).all()
        torch.testing.assert_close(batch["label"].sum(dim=1), torch.ones(8))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_device(saved, device):
    aligner = OpenCLIPAligner.load(saved, device=device)
    assert aligner.embed("text", TEXTS[:2]).device.type == device
    assert aligner.embed("image", torch.rand(2, 3, 32, 32)).device.type == device  # CPU pixels are moved
    assert aligner.embed("image", _uint8_images(2)).device.type == device
