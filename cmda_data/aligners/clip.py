"""CLIPAligner: a pretrained CLIP model as the common latent space (paper Sec. IV-L).

``transformers`` is imported only inside the functions that need it, so
``import cmda_data.aligners`` works without the ``clip`` extra; using CLIP without it
raises :class:`~cmda_data.exceptions.MissingDependencyError` naming
``pip install -e '.[clip]'``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ..core._validation import check_int, fail
from ..exceptions import MissingDependencyError, ValidationError
from ..io._folders import PathLike
from ._image_text import ImageTextAligner
from .base import register_aligner

__all__ = ["CLIPAligner", "require_transformers"]

EXTRA = "pip install -e '.[clip]'"


def require_transformers() -> Any:
    """Import and return ``transformers``; raise :class:`MissingDependencyError` if absent."""
    try:
        import transformers
    except ImportError as error:
        fail("CLIPAligner", f"the optional package 'transformers' (install it with `{EXTRA}`)",
             f"{type(error).__name__}: {error}", MissingDependencyError, raw=True)
    return transformers


#: the aligner's own settings, written next to transformers' config.json by :meth:`CLIPAligner.save`
SETTINGS_NAME = "cmda_clip.json"


def _dtype_keyword(transformers: Any) -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56, ``torch_dtype`` before."""
    try:
        major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _has_vocabulary(tokenizer: Any) -> bool:
    """False for a tokenizer that knows only its special tokens (what ``AutoTokenizer`` builds
    from a folder with a model config and no tokenizer files: every word would be unknown)."""
    try:
        return len(tokenizer) > len(set(tokenizer.all_special_ids))
    except (TypeError, AttributeError):
        return True  # not a transformers tokenizer: trust it


def _features(output: Any, kind: str) -> torch.Tensor:
    """The projected embedding from ``get_{kind}_features`` across transformers versions.

    transformers < 5 returns the projected tensor; transformers 5 returns a
    ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the *projected* embedding.
    """
    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", f"{kind}_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]  # return_dict=False: (last_hidden_state, pooler_output, ...)
    fail(f"CLIPModel.get_{kind}_features output", "a tensor or an output with pooler_output", output,
         ValidationError)


class CLIPAligner(ImageTextAligner):
    """A ``transformers`` ``CLIPModel`` with its image processor and tokenizer.

    Modalities are ``"image"`` and ``"text"``; ``dim`` is the CLIP projection width.

    * ``embed("image", pixels)``: a float tensor ``[n, 3, H, W]`` is taken as already
      preprocessed ``pixel_values``; PIL images, numpy arrays or uint8 tensors (one or a
      list) go through the image processor first.
    * ``embed("text", strings)``: a string or a list of strings, tokenised with padding
      and truncation to the model's context length; a dict with ``input_ids`` (and
      ``attention_mask``) is used as it is.

    Args:
        model: a ``transformers.CLIPModel``.
        processor: a ``CLIPProcessor`` (or ``None``); its parts are used when
            ``image_processor`` / ``tokenizer`` are not given.
        image_processor: turns images into ``pixel_values``.
        tokenizer: turns strings into ``input_ids``.
        max_length: token limit (default: the model's ``max_position_embeddings``).
    """

    kind = "clip"

    def __init__(self, model: Any, processor: Any = None, *, image_processor: Any = None, tokenizer: Any = None,
                 max_length: Optional[int] = None) -> None:
        super().__init__()
        transformers = require_transformers()
        if not isinstance(model, transformers.CLIPModel):
            fail("model", "a transformers.CLIPModel", model)
        self.model = model
        self.processor = processor
        self.image_processor = image_processor if image_processor is not None else getattr(processor, "image_processor", None)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        max_length = check_int("max_length", max_length, minimum=1, allow_none=True)
        self.max_length = max_length or int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, PathLike], device: Any = None, *, dtype: Any = None,
                        max_length: Optional[int] = None, **kwargs: Any) -> "CLIPAligner":
        """Load model and processor from a local folder or a hub name (``HF_HUB_OFFLINE=1`` is honoured).

        A folder without a tokenizer (or without an image processor) gives an aligner that
        takes token ids (or pixel values) only, and says so when given strings (or images).

        Args:
            name_or_path: folder written by ``save_pretrained`` / :meth:`save`, or a hub name.
            device: where to put the model.
            dtype: optional torch dtype of the weights.
            max_length: token limit; default: the one :meth:`save` wrote, else the model's.
            **kwargs: passed to ``CLIPModel.from_pretrained`` (e.g. ``local_files_only=True``).
        """
        transformers = require_transformers()
        source = str(name_or_path)
        model_kwargs = dict(kwargs)
        if dtype is not None:
            model_kwargs[_dtype_keyword(transformers)] = dtype
        model = transformers.CLIPModel.from_pretrained(source, **model_kwargs)
        local = {k: v for k, v in kwargs.items() if k in ("local_files_only", "revision", "cache_dir", "token")}
        processor = image_processor = tokenizer = None
        try:
            processor = transformers.CLIPProcessor.from_pretrained(source, **local)
        except (OSError, ValueError, TypeError, KeyError):
            for loader, slot in ((transformers.AutoImageProcessor, "image"), (transformers.AutoTokenizer, "text")):
                try:
                    part = loader.from_pretrained(source, **local)
                except (OSError, ValueError, TypeError, KeyError):
                    part = None
                if slot == "image":
                    image_processor = part
                else:
                    tokenizer = part if part is not None and _has_vocabulary(part) else None
        settings = Path(source) / SETTINGS_NAME
        if max_length is None and settings.is_file():
            max_length = json.loads(settings.read_text()).get("max_length")
        aligner = cls(model, processor, image_processor=image_processor, tokenizer=tokenizer, max_length=max_length)
        aligner.eval()
        if device is not None:
            aligner.to(device)
        return aligner

    # -- protocol ------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def encode(self, modality: str, batch: Any) -> torch.Tensor:
        if modality == "image":
            pixels = self._pixels(batch)
            out = self.model.get_image_features(pixel_values=pixels)
            return _features(out, "image")
        inputs = self._tokens(batch)
        out = self.model.get_text_features(**inputs)
        return _features(out, "text")

    def preprocess_image(self, image: Any) -> torch.Tensor:
        """One image (PIL or an integer ``[C, H, W]`` tensor) through the model's image processor:
        ``pixel_values`` ``[3, H, W]`` (resized, cropped, normalised)."""
        if self.image_processor is None:
            fail("image batch", "preprocessed float pixel_values [n, 3, H, W] (this aligner has no image "
                 "processor)", image)
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def _pixels(self, batch: Any) -> torch.Tensor:
        if self.image_processor is None and not (isinstance(batch, torch.Tensor) and batch.is_floating_point()):
            fail("image batch", "preprocessed float pixel_values [n, 3, H, W] (this aligner has no image "
                 "processor)", batch)
        return self._pixel_values(
            batch, lambda images: self.image_processor(images=images, return_tensors="pt")["pixel_values"],
            "PIL images")

    def _tokens(self, batch: Any) -> Dict[str, torch.Tensor]:
        if hasattr(batch, "keys"):
            if "input_ids" not in batch:
                fail("text batch", "tokenizer output with 'input_ids'", "keys " + ", ".join(map(repr, batch.keys())),
                     raw=True)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        else:
            texts = [batch] if isinstance(batch, str) else batch
            if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
                fail("text batch", "a string or a non-empty list of strings (or tokenizer output)", batch)
            if self.tokenizer is None:
                fail("text batch", "tokenizer output with input_ids (this aligner has no tokenizer)", batch)
            inputs = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt")
            inputs = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
        return {k: torch.as_tensor(v).to(self.device) for k, v in inputs.items()}

    # -- persistence ---------------------------------------------------------------------
    def get_config(self) -> Dict[str, Any]:
        return {"aligner": self.kind, "dim": self.dim, "max_length": self.max_length}

    def save(self, path: PathLike) -> Path:
        """``save_pretrained`` of model (safetensors + config.json) and processor parts, and the
        aligner's settings (``max_length``) in ``cmda_clip.json``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder))
        (folder / SETTINGS_NAME).write_text(json.dumps(self.get_config(), indent=2))
        for part in (self.processor,) if self.processor is not None else (self.image_processor, self.tokenizer):
            if part is not None:
                part.save_pretrained(str(folder))
        return folder

    @classmethod
    def _from_saved(cls, path: PathLike, config: Dict[str, Any], *, device: Any = None, **kwargs: Any
                    ) -> "CLIPAligner":
        return cls.from_pretrained(path, device=device, **kwargs)


@register_aligner("clip")
def _create_clip(name_or_path: Optional[Union[str, PathLike]] = None, *, model: Any = None, **kwargs: Any
                 ) -> CLIPAligner:
    """Registry factory: ``create_aligner("clip", name_or_path=...)`` or ``(model=..., processor=...)``."""
    if (name_or_path is None) == (model is None):
        fail("create_aligner('clip')", "exactly one of name_or_path or model", f"name_or_path={name_or_path!r}, "
             f"model={type(model).__name__ if model is not None else None}", ValidationError, raw=True)
    if model is not None:
        return CLIPAligner(model, **kwargs)
    return CLIPAligner.from_pretrained(name_or_path, **kwargs)
