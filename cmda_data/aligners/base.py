"""The aligner protocol, its base class and the registry.

An *aligner* maps each modality of a sample into one common latent space, where teacher
and student samples are compared (paper Fig. 1, Algorithm 1 lines 3-4 and 9-10). Every
aligner answers:

* ``embed(modality, batch) -> Tensor[n, d]``: unit rows, no gradient, evaluation mode
  (the train/eval mode of every submodule is restored afterwards);
* ``forward(modality, batch)``: the same with gradient (for training);
* ``modalities`` (tuple of names) and ``dim`` (``d``);
* ``to(device)``, ``state_dict()``, ``save(folder)`` and ``load(folder)``
  (``config.json`` + ``model.safetensors``; never pickle).

Inputs as they come: before :meth:`Aligner.encode`, :meth:`Aligner.prepare_input` turns a
Hugging Face ``datasets`` column (``ds["text"]``) into a list, and PIL images or uint8 image
tensors (``with_format("torch")``) into the float batch the encoder takes, with the aligner's
own preprocessing (:meth:`Aligner.preprocess_image`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Optional, Protocol, Tuple, Type, Union, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..core._fields import is_pil_image, pil_to_tensor
from ..core._validation import fail
from ..exceptions import ShapeError, ValidationError
from ..io._folders import CONFIG_NAME, PathLike, read_config
from ..io._hf import column_values

__all__ = [
    "Aligner",
    "SupportsEmbed",
    "create_aligner",
    "list_aligners",
    "load_aligner",
    "register_aligner",
]


@runtime_checkable
class SupportsEmbed(Protocol):
    """What the rest of cmda_data needs from an aligner (duck typing is enough)."""

    @property
    def modalities(self) -> Tuple[str, ...]: ...

    @property
    def dim(self) -> int: ...

    def embed(self, modality: str, batch: Any) -> torch.Tensor: ...


class Aligner(nn.Module):
    """Base class of the aligners: an ``nn.Module`` with one embedding per modality.

    Subclasses set the class attribute ``kind`` (the name written to ``config.json``) and
    implement :meth:`encode` (raw, unnormalised ``[n, d]`` output), :attr:`modalities`,
    :attr:`dim`, :meth:`get_config` and :meth:`_from_saved`.
    """

    kind: ClassVar[str] = ""
    _kinds: ClassVar[Dict[str, Type["Aligner"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):  # only a class that names its own kind: a subclass that
            Aligner._kinds[cls.kind] = cls  # inherits one must not take over loading that kind

    # -- the protocol --------------------------------------------------------------------
    @property
    def modalities(self) -> Tuple[str, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def dim(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, modality: str, batch: Any) -> torch.Tensor:  # pragma: no cover - abstract
        """Raw (unnormalised) ``[n, d]`` latents of ``batch``; subclasses implement it."""
        raise NotImplementedError

    def check_modality(self, modality: Any) -> str:
        """Return ``modality`` if this aligner knows it, else raise :class:`ValidationError`."""
        if not isinstance(modality, str) or modality not in self.modalities:
            fail("modality", "one of " + ", ".join(repr(m) for m in self.modalities), modality)
        return modality

    # -- inputs as they come -------------------------------------------------------------
    def preprocess_image(self, image: Any) -> torch.Tensor:
        """One image (a PIL image or an integer ``[C, H, W]`` tensor) as the ``[C, H, W]`` float
        tensor this aligner's image encoder takes.

        The default is torchvision's ``ToTensor``: the pixels as float32 in ``[0, 1]`` (uint8
        divided by 255), no resizing, no normalisation. Aligners of pretrained models override
        it with their model's preprocessing (resize, crop, normalise): the CLIP aligner uses its
        image processor. All images of a batch must come out with the same shape.

        Examples:
            >>> from PIL import Image
            >>> import numpy as np
            >>> image = Image.fromarray(np.full((2, 3, 3), 51, dtype=np.uint8))
            >>> Aligner().preprocess_image(image).shape, float(Aligner().preprocess_image(image)[0, 0, 0])
            (torch.Size([3, 2, 3]), 0.2)
        """
        pixels = pil_to_tensor(image) if is_pil_image(image) else image
        if not isinstance(pixels, torch.Tensor) or pixels.ndim not in (2, 3):
            fail("image", "a PIL image or an image tensor [C, H, W]", pixels)
        if pixels.is_floating_point():
            return pixels
        if pixels.dtype == torch.bool or pixels.is_complex():
            fail("image", "a PIL image or an image tensor of integer or float pixels", pixels)
        return pixels.to(torch.float32).div_(float(torch.iinfo(pixels.dtype).max))

    def prepare_input(self, modality: str, batch: Any) -> Any:
        """``batch`` as :meth:`encode` takes it (called by :meth:`forward` and :meth:`embed`).

        * a ``datasets`` column (``ds["text"]``) becomes a list;
        * a list of PIL images, or of integer ``[C, H, W]`` image tensors, becomes one float
          tensor ``[n, C, H, W]``: each image through :meth:`preprocess_image`;
        * a uint8 tensor ``[n, C, H, W]`` (``with_format("torch")`` images) becomes float the
          same way;
        * anything else (float tensors, strings, tokenizer output) is returned as it is.

        Images that come out with different shapes raise a :class:`ShapeError`.
        """
        batch = column_values(batch)
        if isinstance(batch, torch.Tensor):
            if batch.dtype != torch.uint8 or batch.ndim < 3:
                return batch
            if type(self).preprocess_image is Aligner.preprocess_image:  # the default, vectorised
                return batch.to(torch.float32).div_(255.0)
            images = list(batch.unbind(0))
        elif isinstance(batch, (list, tuple)) and batch and all(
                is_pil_image(v) or (isinstance(v, torch.Tensor) and not v.is_floating_point() and v.ndim == 3)
                for v in batch):
            images = list(batch)
        else:
            return batch
        pixels = [self.preprocess_image(image) for image in images]
        shapes = sorted({tuple(p.shape) for p in pixels})
        if len(shapes) > 1:
            fail(f"{modality} batch", "images of one size after preprocess_image (resize them, e.g. with "
                 "dataset.with_transform(...), or override preprocess_image)",
                 "shapes " + ", ".join(map(str, shapes[:4])), ShapeError, raw=True)
        return torch.stack(pixels)

    def forward(self, modality: str, batch: Any) -> torch.Tensor:
        """L2-normalised ``[n, d]`` latents of ``batch`` (with gradient, current mode)."""
        self.check_modality(modality)
        z = self.encode(modality, self.prepare_input(modality, batch))
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.dim:
            fail(f"{type(self).__name__}.encode({modality!r})", f"a [n, {self.dim}] tensor", z, ShapeError)
        return F.normalize(z, dim=-1)

    def embed(self, modality: str, batch: Any) -> torch.Tensor:
        """L2-normalised ``[n, d]`` latents, computed in eval mode under ``torch.no_grad``.

        The train/eval flag of every submodule is restored afterwards, so an encoder the
        user keeps frozen in eval mode stays so.
        """
        self.check_modality(modality)
        modes = [(module, module.training) for module in self.modules()]
        try:
            self.eval()
            with torch.no_grad():
                return self.forward(modality, batch)
        finally:
            for module, training in modes:
                module.training = training

    # -- persistence ---------------------------------------------------------------------
    def get_config(self) -> Dict[str, Any]:  # pragma: no cover - abstract
        """JSON-serialisable settings written to ``config.json`` by :meth:`save`."""
        raise NotImplementedError

    def save(self, path: PathLike) -> Path:  # pragma: no cover - abstract
        """Write the aligner to the folder ``path`` (``config.json`` + ``model.safetensors``)."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: PathLike, **kwargs: Any) -> "Aligner":
        """Load an aligner saved with :meth:`save`.

        Called on :class:`Aligner` itself, the class is chosen from ``config.json``;
        called on a subclass, the folder must hold that kind of aligner. Extra keyword
        arguments (``encoders=...``, ``device=...``) go to the subclass.
        """
        config = read_config(path)
        kind = _kind_of(config)
        target = Aligner._kinds.get(kind)
        if target is None:
            fail(f"{Path(path) / CONFIG_NAME}", "an aligner kind in " + ", ".join(sorted(Aligner._kinds)), kind)
        if cls is not Aligner and not issubclass(target, cls):
            fail(f"{cls.__name__}.load(path)", f"a folder saved by {cls.__name__}",
                 f"a folder saved by {target.__name__} (kind {kind!r})", ValidationError, raw=True)
        return target._from_saved(path, config, **kwargs)

    @classmethod
    def _from_saved(cls, path: PathLike, config: Dict[str, Any], **kwargs: Any) -> "Aligner":
        raise NotImplementedError  # pragma: no cover - abstract

    def _restore(self, tensors: Dict[str, torch.Tensor], path: PathLike, *, strict: bool, expected: str,
                 device: Any = None) -> "Aligner":
        """Load saved weights (a mismatch names the folder and what was expected), then move."""
        try:
            self.load_state_dict(tensors, strict=strict)
        except RuntimeError as error:
            fail(f"load({str(path)!r})", expected, str(error), ShapeError, raw=True)
        if device is not None:
            self.to(device)
        return self

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}, dim={self.dim}"


def _kind_of(config: Dict[str, Any]) -> str:
    if "aligner" in config:
        return str(config["aligner"])
    if config.get("model_type") == "clip":  # a plain transformers CLIP folder
        return "clip"
    return repr(None)


def load_aligner(path: PathLike, **kwargs: Any) -> Aligner:
    """Load any saved aligner (same as ``Aligner.load(path, **kwargs)``).

    Examples:
        >>> import tempfile
        >>> from cmda_data.aligners import PrecomputedAligner
        >>> table = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
        >>> folder = tempfile.mkdtemp()
        >>> _ = PrecomputedAligner({"image": table, "text": table}).save(folder)
        >>> load_aligner(folder).embed("image", [0])
        tensor([[0.6000, 0.8000]])
    """
    return Aligner.load(path, **kwargs)


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------
_REGISTRY: Dict[str, Callable[..., Any]] = {}


def register_aligner(name: str, factory: Optional[Callable[..., Any]] = None, *, overwrite: bool = False
                     ) -> Union[Callable[..., Any], Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """Register ``factory`` (a class or function returning an aligner) under ``name``.

    Usable as a decorator: ``@register_aligner("mine")``. Re-registering a name raises a
    :class:`ValidationError` unless ``overwrite=True``.

    Examples:
        >>> @register_aligner("doctest-identity")
        ... def make(table):
        ...     from cmda_data.aligners import PrecomputedAligner
        ...     return PrecomputedAligner({"a": table, "b": table})
        >>> "doctest-identity" in list_aligners()
        True
    """
    if not isinstance(name, str) or not name:
        fail("name", "a non-empty string", name)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(func):
            fail("factory", "a class or callable returning an aligner", func)
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not func:
            fail("name", f"a name not registered yet (or overwrite=True); {name!r} is taken by "
                 f"{getattr(_REGISTRY[name], '__qualname__', _REGISTRY[name])}", name)
        _REGISTRY[name] = func
        return func

    return decorate if factory is None else decorate(factory)


def create_aligner(name: str, **kwargs: Any) -> Any:
    """Build the aligner registered as ``name`` with ``kwargs``.

    Built in: ``"contrastive"`` (:class:`ContrastiveAligner`), ``"clip"``
    (:meth:`CLIPAligner.from_pretrained`), ``"precomputed"`` (:class:`PrecomputedAligner`).

    Examples:
        >>> table = torch.eye(3)
        >>> aligner = create_aligner("precomputed", tables={"image": table, "text": table})
        >>> aligner.dim
        3
    """
    factory = _REGISTRY.get(name) if isinstance(name, str) else None
    if factory is None:
        fail("name", "a registered aligner: " + ", ".join(repr(n) for n in list_aligners()), name)
    return factory(**kwargs)


def list_aligners() -> List[str]:
    """The registered aligner names, sorted."""
    return sorted(_REGISTRY)
