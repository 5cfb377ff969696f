"""What the two CLIP-style aligners share: an ``image`` and a ``text`` tower in ``self.model``.

:class:`~cmda_data.aligners.CLIPAligner` (transformers) and
:class:`~cmda_data.aligners.OpenCLIPAligner` (open_clip) differ in how they preprocess and
tokenise; the protocol properties and the pixel batch's checks are written here once.
"""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

import torch

from ..core._validation import describe, fail
from ..exceptions import ShapeError
from .base import Aligner


class ImageTextAligner(Aligner):
    """Base of the aligners whose ``model`` embeds ``"image"`` and ``"text"`` (not registered)."""

    model: torch.nn.Module

    @property
    def modalities(self) -> Tuple[str, ...]:
        return ("image", "text")

    @property
    def device(self) -> torch.device:
        for tensor in self.model.parameters():
            return tensor.device
        return torch.device("cpu")  # pragma: no cover - CLIP models have parameters

    def _pixel_values(self, batch: Any, preprocess: Callable[[List[Any]], torch.Tensor], accepted: str
                      ) -> torch.Tensor:
        """The ``[n, 3, H, W]`` pixels of ``batch`` on the model's device and dtype.

        A float tensor is taken as preprocessed pixels (4-D, at least one image); anything
        else is split into a list of images (a list or tuple as it is, a stacked 4-D tensor or
        array by its first axis, otherwise one image) and passed to ``preprocess``. ``accepted``
        words the other forms for the shape error. Non-finite pixels are refused either way.
        """
        if isinstance(batch, torch.Tensor) and batch.is_floating_point():
            if batch.ndim != 4:
                fail("image batch", f"float pixel values of shape [n, 3, H, W] (or {accepted})", batch, ShapeError)
            if batch.shape[0] == 0:
                fail("image batch", "at least one image", batch, ShapeError)
            pixels = batch
        else:
            if isinstance(batch, (list, tuple)):
                images = list(batch)
            elif getattr(batch, "ndim", None) == 4:
                images = list(batch)  # a stacked batch (tensor [n, C, H, W], numpy [n, H, W, C])
            else:
                images = [batch]
            if not images:
                fail("image batch", "at least one image", batch)
            pixels = preprocess(images)
        if not torch.isfinite(pixels).all():
            fail("image batch", "finite pixel values", "NaN or Inf in " + describe(pixels), raw=True)
        dtype = next(self.model.parameters()).dtype
        return pixels.to(device=self.device, dtype=dtype)
