"""OpenCLIPAligner: an ``open_clip`` model as the common latent space.

``open_clip`` (the ``openclip`` extra, ``open_clip_torch >= 3``) is imported only inside the
functions that need it, so ``import cmda_data.aligners`` works without it; using the aligner
without it raises :class:`~cmda_data.exceptions.MissingDependencyError` naming
``pip install -e '.[openclip]'``.

No checkpoint is ever unpickled: weights are read from ``.safetensors`` files only (a
pretrained tag or an ``hf-hub:`` repository that offers nothing else is refused), and
:meth:`OpenCLIPAligner.save` writes ``config.json`` (model name, open_clip model config,
preprocessing) and ``model.safetensors``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ..core._validation import fail
from ..exceptions import MissingDependencyError, ShapeError, ValidationError
from ..io._folders import PathLike, load_folder, save_folder
from ._image_text import ImageTextAligner
from .base import register_aligner

__all__ = ["OpenCLIPAligner", "require_open_clip"]

EXTRA = "pip install -e '.[openclip]'"
#: written next to config.json so that open_clip itself reads a saved folder (``local-dir:``)
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
_PREFERRED_WEIGHTS = (SAFE_WEIGHTS_NAME, "open_clip_pytorch_model.safetensors", "model.safetensors")


def require_open_clip() -> Any:
    """Import and return ``open_clip``; raise :class:`MissingDependencyError` if absent."""
    try:
        import open_clip
    except ImportError as error:
        fail("OpenCLIPAligner", f"the optional package 'open_clip_torch' (install it with `{EXTRA}`)",
             f"{type(error).__name__}: {error}", MissingDependencyError, raw=True)
    return open_clip


def _check_model_cfg(model_cfg: Any) -> Dict[str, Any]:
    keys = ("embed_dim", "vision_cfg", "text_cfg")
    if not isinstance(model_cfg, Mapping) or not all(k in model_cfg for k in keys):
        fail("model_cfg", "an open_clip model config: a dict with 'embed_dim', 'vision_cfg' and 'text_cfg'",
             model_cfg)
    return json.loads(json.dumps(dict(model_cfg)))  # a JSON-clean deep copy (tuples become lists)


def _safetensors_only(checkpoint: Union[str, Path], name: str) -> str:
    if not str(checkpoint).endswith(".safetensors"):
        fail(name, "a .safetensors checkpoint (cmda_data never unpickles weights; convert a trusted .pt/.bin "
             "once with torch.load(..., weights_only=True) and safetensors.torch.save_file)", str(checkpoint),
             ValidationError, raw=True)
    return str(checkpoint)


def _fetch(name: str, what: str, download: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Run one of open_clip's downloads (or cache look-ups); its errors name the argument."""
    try:
        return str(download(*args, **kwargs))
    except (OSError, RuntimeError, ValueError) as error:
        fail(name, what + " (downloaded, or cached with HF_HUB_OFFLINE=1)", f"{type(error).__name__}: {error}",
             ValidationError, raw=True)


def _tag_weights(open_clip: Any, tag: Mapping[str, Any], cache_dir: Optional[str]) -> str:
    """The safetensors file of a pretrained tag; only a safetensors file is ever fetched."""
    if tag.get("file"):
        return _safetensors_only(tag["file"], "pretrained")
    if not tag.get("hf_hub"):
        fail("pretrained", "a tag whose weights are on the Hugging Face hub as .safetensors (this one is a "
             "pickled file at a URL)", tag.get("url", ""), ValidationError, raw=True)
    model_id, filename = os.path.split(str(tag["hf_hub"]))  # "org/repo/" names the default file
    if filename in ("", "open_clip_pytorch_model.bin"):
        filename = SAFE_WEIGHTS_NAME
    elif filename.endswith((".bin", ".pth")):
        filename = filename[:-4] + ".safetensors"
    return _fetch("pretrained", f"the weights {model_id}/{filename}", open_clip.pretrained.download_pretrained_from_hf,
                  model_id, filename=filename, cache_dir=cache_dir)


def _read_open_clip_config(file: Union[str, Path]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(model_cfg, preprocess_cfg)`` of an ``open_clip_config.json``."""
    try:
        saved = json.loads(Path(file).read_text(encoding="utf-8"))
    except ValueError as error:
        fail(str(file), "valid JSON", str(error), ValidationError, raw=True)
    if not isinstance(saved, dict):
        fail(str(file), "a JSON object with 'model_cfg'", saved)
    return saved.get("model_cfg", saved), saved.get("preprocess_cfg", {})


def _weights_in(folder: Path, name: str) -> str:
    """The safetensors checkpoint of an open_clip ``local-dir:`` folder."""
    found = [folder / n for n in _PREFERRED_WEIGHTS if (folder / n).is_file()] or sorted(folder.glob("*.safetensors"))
    if not found:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        fail(name, "a folder with open_clip_config.json and weights in a .safetensors file"
             + (" (cmda_data never unpickles .bin/.pt/.pth files)" if others else ""),
             f"{folder} holding {others or 'no weights'}", ValidationError, raw=True)
    return str(found[0])


def _instantiate(open_clip: Any, model_cfg: Dict[str, Any], preprocess_cfg: Mapping[str, Any]) -> torch.nn.Module:
    """Build the (randomly initialised) model of ``model_cfg`` the way ``open_clip.create_model``
    does, without loading or downloading any weights."""
    cfg = copy.deepcopy(model_cfg)
    vision, text = cfg.setdefault("vision_cfg", {}), cfg.setdefault("text_cfg", {})
    if "timm_model_name" in vision:
        vision["timm_model_pretrained"] = False
    hf_text = "hf_model_name" in text
    if hf_text:
        text["hf_model_pretrained"] = False
    custom_text = cfg.pop("custom_text", False) or hf_text
    if custom_text:
        model_class = open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CustomTextCLIP
    else:
        model_class = open_clip.CLIP
    try:
        model = model_class(**cfg)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as error:
        fail("model_cfg", "a config open_clip can build", f"{type(error).__name__}: {error}", ValidationError,
             raw=True)
    pre = open_clip.transform.merge_preprocess_dict(open_clip.transform.PreprocessCfg(), dict(preprocess_cfg))
    size = getattr(getattr(model, "visual", None), "image_size", None)
    if size is not None:
        pre["size"] = size
    open_clip.set_model_preprocess_cfg(model, pre)
    return model


def _make_tokenizer(open_clip: Any, model_name: str, model_cfg: Mapping[str, Any], context_length: int,
                    cache_dir: Optional[str] = None) -> Any:
    """The tokenizer ``open_clip.get_tokenizer`` would choose for this config."""
    text_cfg = model_cfg.get("text_cfg", {})
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length,
                                               cache_dir=cache_dir, tokenizer_mode=text_cfg.get("tokenizer_mode"),
                                               **kwargs)
    if ":" not in model_name and "siglip" in model_name.lower():
        return open_clip.get_tokenizer(model_name, context_length=context_length, cache_dir=cache_dir)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length, **kwargs)


def _to_pil(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor) and not (image.is_floating_point() or image.is_complex()) \
            and image.dtype not in (torch.uint8, torch.bool):  # int16, int32, ...: scaled to uint8
        scale = 255.0 / torch.iinfo(image.dtype).max
        image = (image.to(torch.float64) * scale).round().clamp(0, 255).to(torch.uint8)
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim not in (2, 3):
        fail("image batch", "float pixel values [n, 3, H, W], PIL images, or uint8 arrays/tensors "
             "([H, W], [H, W, C] or, for tensors, [C, H, W])", image)
    if isinstance(image, torch.Tensor) and array.ndim == 3:
        array = array.transpose(1, 2, 0)  # torch images are channels-first
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array)


class OpenCLIPAligner(ImageTextAligner):
    """An ``open_clip`` model (CLIP, SigLIP, EVA, CoCa, ...) with its preprocessing and tokenizer.

    Modalities are ``"image"`` and ``"text"``; ``dim`` is the model's ``embed_dim``.

    * ``embed("image", x)``: a float tensor ``[n, 3, H, W]`` is taken as already
      preprocessed pixels; PIL images, uint8 numpy arrays or uint8 tensors (one, a list,
      or a stacked ``[n, C, H, W]`` uint8 tensor; other integer tensors are scaled to uint8 first)
      go through the model's preprocessing (:meth:`preprocess_image`).
    * ``embed("text", x)``: a string or a sequence of strings (tokenised by open_clip's
      tokenizer for the model), or an integer tensor ``[n, context_length]`` of token ids.

    Build one with :meth:`from_pretrained`; the constructor wraps a model you already have.

    Args:
        model: an open_clip model (anything with ``encode_image`` and ``encode_text``).
        preprocess: PIL image -> ``[3, H, W]`` tensor (default: the model's own
            evaluation transform).
        tokenizer: list of strings -> ``[n, context_length]`` token ids (default: open_clip's
            tokenizer for the model). A tokenizer you pass is not saved.
        model_name: the open_clip model name (written by :meth:`save`).
        model_cfg: the open_clip model config dict (default: the built-in config of
            ``model_name``). Needed by :meth:`save`.
    """

    kind = "openclip"

    def __init__(self, model: Any, preprocess: Optional[Callable[[Any], torch.Tensor]] = None,
                 tokenizer: Optional[Callable[[List[str]], torch.Tensor]] = None, *,
                 model_name: Optional[str] = None, model_cfg: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        open_clip = require_open_clip()
        if not isinstance(model, torch.nn.Module) or not all(callable(getattr(model, m, None))
                                                            for m in ("encode_image", "encode_text")):
            fail("model", "an open_clip model (an nn.Module with encode_image and encode_text)", model)
        if model_name is not None and (not isinstance(model_name, str) or not model_name):
            fail("model_name", "a non-empty string or None", model_name)
        if model_cfg is None and model_name is not None and ":" not in model_name:
            model_cfg = open_clip.get_model_config(model_name.replace("/", "-"))
        self.model = model
        self.model_name = model_name
        self.model_cfg = None if model_cfg is None else _check_model_cfg(model_cfg)
        for name, value in (("preprocess", preprocess), ("tokenizer", tokenizer)):
            if value is not None and not callable(value):
                fail(name, "a callable or None", value)
        if preprocess is None:
            cfg = open_clip.transform.merge_preprocess_dict(open_clip.transform.PreprocessCfg(),
                                                            open_clip.get_model_preprocess_cfg(model))
            preprocess = open_clip.transform.image_transform_v2(open_clip.transform.PreprocessCfg(**cfg), is_train=False)
        self.preprocess = preprocess
        self.context_length = int(open_clip.get_model_tokenize_cfg(model).get("context_length", 77))
        if tokenizer is None:
            tokenizer = _make_tokenizer(open_clip, model_name or "", self.model_cfg or {}, self.context_length)
        self.tokenizer = tokenizer
        if self.model_cfg is not None:
            self._dim = int(self.model_cfg["embed_dim"])
        else:  # no config: one dry run of the text tower tells the width
            with torch.no_grad():
                probe = torch.zeros(1, self.context_length, dtype=torch.long, device=self.device)
                training = model.training
                model.eval()
                self._dim = int(model.encode_text(probe).shape[-1])
                model.train(training)

    @classmethod
    def from_pretrained(cls, model_name: str, pretrained: Optional[Union[str, PathLike]] = None, *,
                        model_cfg: Optional[Mapping[str, Any]] = None, device: Any = None,
                        cache_dir: Optional[str] = None) -> "OpenCLIPAligner":
        """Build an open_clip model and its weights; never unpickles a file.

        A tag whose weights were trained with QuickGELU switches the config to it (open_clip only
        warns), and the tag's preprocessing (mean, std, interpolation) is used.

        Args:
            model_name: an open_clip model name (``open_clip.list_models()``, e.g.
                ``"ViT-B-32"``), ``"hf-hub:org/repo"`` or ``"local-dir:/folder"`` (a folder with
                ``open_clip_config.json`` and ``.safetensors`` weights, such as one written by
                :meth:`save`). With ``model_cfg``, any name you choose.
            pretrained: a pretrained tag of ``model_name`` (``open_clip.list_pretrained_tags_by_model``;
                downloaded by open_clip unless cached, ``HF_HUB_OFFLINE=1`` is honoured) or the
                path of a ``.safetensors`` checkpoint. ``None``: random weights (or a schema's own).
            model_cfg: an open_clip model config dict (``embed_dim``, ``vision_cfg``,
                ``text_cfg``) for a custom architecture.
            device: where to put the model.
            cache_dir: open_clip's download cache.
        """
        open_clip = require_open_clip()
        if not isinstance(model_name, str) or not model_name:
            fail("model_name", "an open_clip model name, 'hf-hub:org/repo' or 'local-dir:/folder'", model_name)
        schema, _, identifier = model_name.partition(":") if model_name.startswith(("hf-hub:", "local-dir:")) \
            else ("", "", model_name)
        if schema and pretrained is not None:
            fail("pretrained", f"None with {schema + ':'} (the weights come from there)", pretrained)
        if schema and model_cfg is not None:
            fail("model_cfg", f"None with {schema + ':'} (the config comes from there)", "a dict", raw=True)
        preprocess: Dict[str, Any] = {}
        checkpoint: Optional[str] = None
        if schema == "local-dir":
            folder = Path(identifier)
            if not (folder / OPEN_CLIP_CONFIG_NAME).is_file():
                fail("model_name", f"'local-dir:' and a folder containing {OPEN_CLIP_CONFIG_NAME}", str(folder),
                     ValidationError, raw=True)
            model_cfg, preprocess = _read_open_clip_config(folder / OPEN_CLIP_CONFIG_NAME)
            checkpoint = _weights_in(folder, "model_name")
        elif schema == "hf-hub":
            download = open_clip.pretrained.download_pretrained_from_hf
            config_file = _fetch("model_name", f"the config {identifier}/{OPEN_CLIP_CONFIG_NAME}", download,
                                 identifier, filename=OPEN_CLIP_CONFIG_NAME, cache_dir=cache_dir)
            model_cfg, preprocess = _read_open_clip_config(config_file)
            checkpoint = _fetch("model_name", f"the weights {identifier}/{SAFE_WEIGHTS_NAME}", download, identifier,
                                filename=SAFE_WEIGHTS_NAME, cache_dir=cache_dir)
        else:
            if model_cfg is None:
                model_cfg = open_clip.get_model_config(model_name.replace("/", "-"))
                if model_cfg is None:
                    fail("model_name", f"one of the {len(open_clip.list_models())} open_clip model names "
                         "(open_clip.list_models()), 'hf-hub:org/repo', 'local-dir:/folder', or model_cfg=",
                         model_name)
            model_cfg = _check_model_cfg(model_cfg)
            if pretrained is not None:
                tag = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), str(pretrained))
                if tag:
                    checkpoint = _tag_weights(open_clip, tag, cache_dir)
                    preprocess = tag
                    if tag.get("quick_gelu", False) != model_cfg.get("quick_gelu", False):
                        model_cfg["quick_gelu"] = bool(tag.get("quick_gelu", False))
                elif os.path.isfile(pretrained):
                    checkpoint = _safetensors_only(pretrained, "pretrained")
                else:
                    tags = open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))
                    fail("pretrained", f"a pretrained tag of {model_name!r} ({', '.join(tags) or 'none known'}) "
                         "or a .safetensors checkpoint file", pretrained)
        model_cfg = _check_model_cfg(model_cfg)
        model = _instantiate(open_clip, model_cfg, preprocess)
        if checkpoint is not None:
            try:
                open_clip.load_checkpoint(model, checkpoint, strict=True, device="cpu")
            except (RuntimeError, KeyError) as error:
                fail(f"from_pretrained({model_name!r})", f"weights matching the model config ({checkpoint})",
                     f"{type(error).__name__}: {error}", ShapeError, raw=True)
        tokenizer = _make_tokenizer(open_clip, model_name, model_cfg,
                                    int(open_clip.get_model_tokenize_cfg(model).get("context_length", 77)), cache_dir)
        aligner = cls(model, tokenizer=tokenizer, model_name=model_name, model_cfg=model_cfg)
        aligner.eval()
        if device is not None:
            aligner.to(device)
        return aligner

    # -- protocol ------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, modality: str, batch: Any) -> torch.Tensor:
        if modality == "image":
            return self.model.encode_image(self._pixels(batch))
        return self.model.encode_text(self._tokens(batch))

    def preprocess_image(self, image: Any) -> torch.Tensor:
        """One image (PIL, an integer ``[C, H, W]`` tensor or a uint8 ``[H, W, C]`` array) through the
        model's own preprocessing (resize, centre crop, normalise): a float ``[3, H, W]`` tensor."""
        if self.preprocess is None:
            fail("image batch", "float pixel values [n, 3, H, W] (this aligner has no preprocess)", image)
        return self.preprocess(_to_pil(image))

    def _pixels(self, batch: Any) -> torch.Tensor:
        return self._pixel_values(batch, lambda images: torch.stack([self.preprocess_image(i) for i in images]),
                                  "PIL images, uint8 images")

    def _tokens(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            if batch.is_floating_point() or batch.dtype == torch.bool or batch.ndim != 2 or batch.shape[0] == 0:
                fail("text batch", "strings or integer token ids of shape [n, context_length]", batch, ShapeError)
            tokens = batch
        else:
            if isinstance(batch, str):
                texts: Any = [batch]
            elif isinstance(batch, (list, tuple)) or (hasattr(batch, "__iter__") and hasattr(batch, "__len__")
                                                       and not isinstance(batch, (Mapping, np.ndarray, bytes))):
                texts = list(batch)  # also a datasets Column
            else:
                texts = batch
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                fail("text batch", "a string or a non-empty sequence of strings (or token ids)", batch)
            if self.tokenizer is None:
                fail("text batch", "integer token ids (this aligner has no tokenizer)", batch)
            tokens = torch.as_tensor(self.tokenizer(texts))
        return tokens.to(self.device)

    # -- persistence ---------------------------------------------------------------------
    def get_config(self) -> Dict[str, Any]:
        open_clip = require_open_clip()
        preprocess = open_clip.transform.merge_preprocess_dict(open_clip.transform.PreprocessCfg(),
                                                               open_clip.get_model_preprocess_cfg(self.model))
        return {"aligner": self.kind, "dim": self.dim, "model_name": self.model_name, "model_cfg": self.model_cfg,
                "preprocess_cfg": json.loads(json.dumps(preprocess)), "context_length": self.context_length}

    def save(self, path: PathLike) -> Path:
        """Write ``config.json`` (model name, open_clip config, preprocessing), the weights in
        ``model.safetensors`` and ``open_clip_config.json``, so that the folder also loads in
        open_clip itself as ``local-dir:<folder>``. A custom ``tokenizer`` is not saved."""
        if self.model_cfg is None:
            fail("OpenCLIPAligner.save", "an aligner that knows its open_clip model config (pass model_cfg= "
                 "or a built-in model_name)", "model_cfg=None", ValidationError, raw=True)
        config = self.get_config()
        folder = save_folder(path, config, self.model.state_dict())
        open_clip_config = {"model_cfg": config["model_cfg"], "preprocess_cfg": config["preprocess_cfg"]}
        (folder / OPEN_CLIP_CONFIG_NAME).write_text(json.dumps(open_clip_config, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def _from_saved(cls, path: PathLike, config: Dict[str, Any], *, device: Any = None,
                    tokenizer: Optional[Callable[[List[str]], torch.Tensor]] = None) -> "OpenCLIPAligner":
        open_clip = require_open_clip()
        config, tensors = load_folder(path)
        model_cfg = _check_model_cfg(config.get("model_cfg"))
        model = _instantiate(open_clip, model_cfg, config.get("preprocess_cfg") or {})
        aligner = cls(model, tokenizer=tokenizer, model_name=config.get("model_name"), model_cfg=model_cfg)
        aligner._restore({f"model.{key}": value for key, value in tensors.items()}, path, strict=True,
                         expected="weights matching the saved open_clip config", device=device)
        return aligner.eval()


@register_aligner("openclip")
def _create_openclip(model_name: Optional[str] = None, pretrained: Optional[Union[str, PathLike]] = None, *,
                     model: Any = None, **kwargs: Any) -> OpenCLIPAligner:
    """Registry factory: ``create_aligner("openclip", model_name=..., pretrained=...)`` or ``(model=...)``."""
    if model is not None:
        if pretrained is not None:
            fail("create_aligner('openclip')", "pretrained=None with model= (the model has its weights)",
                 pretrained)
        return OpenCLIPAligner(model, model_name=model_name, **kwargs)
    if model_name is None:
        fail("create_aligner('openclip')", "model_name= (with pretrained=) or model=", "neither", ValidationError,
             raw=True)
    return OpenCLIPAligner.from_pretrained(model_name, pretrained, **kwargs)
