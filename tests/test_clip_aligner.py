"""CLIPAligner on a tiny random CLIP saved to tmp_path (no network), and the lazy import."""

from __future__ import annotations

import os
import string
import subprocess
import sys

import pytest
import torch
from conftest import CPU_AND_CUDA, REPO_ROOT

from cmda_data.aligners import Aligner, CLIPAligner, create_aligner, load_aligner
from cmda_data.exceptions import MissingDependencyError, ShapeError, ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never touch the network


def test_import_does_not_pull_in_transformers():
    code = ("import sys, cmda_data, cmda_data.aligners, cmda_data.core.losses; "
            "from cmda_data.aligners import CLIPAligner, create_aligner; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[clip\]'"):
        CLIPAligner.from_pretrained("anything")
    with pytest.raises(ImportError, match=r"CLIPAligner: expected the optional package 'transformers'"):
        CLIPAligner(object())


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.CLIPModel(config)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                      crop_size={"height": 32, "width": 32})
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    folder = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return CLIPAligner.from_pretrained(tiny_clip_dir)


TEXTS = ["a cat", "a dog on a mat", "birds", "the quick brown fox jumps", "z"]


def _pil_images(n=5, seed=0):
    Image = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(seed)
    arrays = [(torch.rand(40 + 3 * k, 36, 3, generator=g) * 255).to(torch.uint8).numpy() for k in range(n)]
    return [Image.fromarray(a) for a in arrays]


def test_shapes_norms_and_protocol(clip):
    assert clip.modalities == ("image", "text") and clip.dim == 16
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    z_img = clip.embed("image", pixels)
    z_txt = clip.embed("text", TEXTS)
    assert z_img.shape == (3, 16) and z_txt.shape == (5, 16)
    torch.testing.assert_close(z_img.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(z_txt.norm(dim=1), torch.ones(5))
    assert not z_img.requires_grad and not z_txt.requires_grad
    assert clip.embed("text", "a cat").shape == (1, 16)


def test_deterministic_and_batching_invariant(clip):
    images = _pil_images()
    whole = clip.embed("image", images)
    torch.testing.assert_close(clip.embed("image", images), whole, atol=0, rtol=0)
    single = torch.cat([clip.embed("image", [im]) for im in images])
    torch.testing.assert_close(single, whole, atol=1e-5, rtol=0)
    texts = clip.embed("text", TEXTS)
    torch.testing.assert_close(clip.embed("text", TEXTS), texts, atol=0, rtol=0)
    one_by_one = torch.cat([clip.embed("text", [t]) for t in TEXTS])
    torch.testing.assert_close(one_by_one, texts, atol=1e-5, rtol=0)


def test_pil_images_equal_their_preprocessed_pixels(clip):
    images = _pil_images(2, seed=3)
    pixels = clip.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(clip.embed("image", images), clip.embed("image", pixels), atol=1e-6, rtol=0)


def test_matches_transformers_directly(clip):
    inputs = clip.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model.get_text_features(**inputs)
    raw = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(clip.embed("text", TEXTS), torch.nn.functional.normalize(raw, dim=-1))
    torch.testing.assert_close(clip.embed("text", dict(inputs)), clip.embed("text", TEXTS))


def test_forward_has_grad_and_embed_restores_mode(clip):
    clip.train()
    try:
        z = clip("text", TEXTS[:2])
        assert z.requires_grad
        clip.embed("image", torch.rand(1, 3, 32, 32))
        assert clip.training and clip.model.training
    finally:
        clip.eval()


def test_bad_inputs(clip):
    with pytest.raises(ValidationError, match=r"modality: expected one of 'image', 'text', got 'audio'"):
        clip.embed("audio", TEXTS)
    with pytest.raises(ShapeError, match=r"image batch: expected float pixel values of shape \[n, 3, H, W\] "
                                         r"\(or PIL images\)"):
        clip.embed("image", torch.rand(3, 32, 32))
    with pytest.raises(ShapeError, match=r"image batch: expected at least one image"):
        clip.embed("image", torch.rand(0, 3, 32, 32))
    with pytest.raises(ValidationError, match=r"image batch: expected finite pixel values, got NaN or Inf"):
        clip.embed("image", torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ValidationError, match=r"text batch: expected a string or a non-empty list of strings"):
        clip.embed("text", [1, 2])
    with pytest.raises(ValidationError, match=r"text batch: expected tokenizer output with 'input_ids'"):
        clip.embed("text", {"ids": torch.ones(1, 3, dtype=torch.long)})
    with pytest.raises(ValidationError, match=r"model: expected a transformers.CLIPModel"):
        CLIPAligner(torch.nn.Linear(2, 2))
    with pytest.raises(ShapeError, match=r"image batch: expected at least one image, got tensor of shape \(0, 3, 32, 32\)"):
        clip.embed("image", torch.rand(0, 3, 32, 32))
    with pytest.raises(ValidationError, match=r"max_length: expected an integer >= 1 or None, got 0 \(int\)"):
        CLIPAligner(clip.model, clip.processor, max_length=0)


def test_save_load_and_registry(clip, tiny_clip_dir, tmp_path):
    clip.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    for loaded in (CLIPAligner.load(tmp_path / "saved"), Aligner.load(tmp_path / "saved"),
                   load_aligner(tiny_clip_dir), create_aligner("clip", name_or_path=tiny_clip_dir),
                   create_aligner("clip", model=clip.model, processor=clip.processor)):
        assert isinstance(loaded, CLIPAligner)
        torch.testing.assert_close(loaded.embed("text", TEXTS), clip.embed("text", TEXTS))
    with pytest.raises(ValidationError, match=r"create_aligner\('clip'\): expected exactly one of name_or_path"):
        create_aligner("clip")


def test_save_keeps_max_length_and_loads_in_eval_mode(clip, tmp_path):
    short = CLIPAligner(clip.model, clip.processor, max_length=5)
    short.save(tmp_path / "short")
    for loaded in (CLIPAligner.load(tmp_path / "short"), Aligner.load(tmp_path / "short")):
        assert loaded.max_length == 5 and not loaded.training and not loaded.model.training
        long_text = ["a b c d e f g h"]  # 8 words: cut to 5 tokens, as by the saved aligner
        torch.testing.assert_close(loaded.embed("text", long_text), short.embed("text", long_text))
    assert CLIPAligner.from_pretrained(tmp_path / "short", max_length=7).max_length == 7  # an explicit one wins


def test_a_folder_without_tokenizer_files_takes_token_ids_only(clip, tmp_path):
    # AutoTokenizer builds an empty CLIP tokenizer from a bare model folder: every word would
    # become the unknown token, silently. The aligner refuses strings instead.
    clip.model.save_pretrained(str(tmp_path / "bare"))
    bare = CLIPAligner.from_pretrained(tmp_path / "bare")
    assert bare.tokenizer is None and bare.image_processor is None
    with pytest.raises(ValidationError, match=r"text batch: expected tokenizer output with input_ids \(this aligner "
                                               r"has no tokenizer\)"):
        bare.embed("text", TEXTS)
    tokens = clip.tokenizer(TEXTS, padding=True, return_tensors="pt")
    torch.testing.assert_close(bare.embed("text", dict(tokens)), clip.embed("text", TEXTS))


def test_model_without_processor_accepts_pixels_and_tokens(clip):
    bare = CLIPAligner(clip.model)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(bare.embed("image", pixels), clip.embed("image", pixels))
    with pytest.raises(ValidationError, match=r"text batch: expected tokenizer output with input_ids"):
        bare.embed("text", TEXTS)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_device(tiny_clip_dir, device):
    aligner = CLIPAligner.from_pretrained(tiny_clip_dir, device=device)
    z = aligner.embed("text", TEXTS[:2])
    assert z.device.type == device
    z_img = aligner.embed("image", torch.rand(2, 3, 32, 32))  # CPU pixels are moved to the model
    assert z_img.device.type == device
