"""Aligners: map every modality into one common latent space.

* :class:`ContrastiveAligner` - encoders + the paper's projection heads, trained with
  Eq. 7 / Eq. 8 / SupCon (offline ``fit`` or online ``joint_loss``, Eq. 9).
* :class:`CLIPAligner` - a pretrained ``transformers`` CLIP model (optional ``clip``
  extra; ``transformers`` is imported only when a CLIPAligner is built).
* :class:`OpenCLIPAligner` - an ``open_clip`` model (optional ``openclip`` extra;
  ``open_clip`` is imported only when an OpenCLIPAligner is built).
* :class:`PrecomputedAligner` - embedding tables looked up by data set index.

Build one by name with :func:`create_aligner`; load any saved one with :func:`load_aligner`.
"""

from __future__ import annotations

from .base import Aligner, SupportsEmbed, create_aligner, list_aligners, load_aligner, register_aligner
from .clip import CLIPAligner
from .contrastive import PAPER_HEAD_HIDDEN, ContrastiveAligner, default_head_hidden
from .openclip import OpenCLIPAligner
from .precomputed import PrecomputedAligner

__all__ = [
    "Aligner",
    "CLIPAligner",
    "ContrastiveAligner",
    "OpenCLIPAligner",
    "PAPER_HEAD_HIDDEN",
    "PrecomputedAligner",
    "SupportsEmbed",
    "create_aligner",
    "default_head_hidden",
    "list_aligners",
    "load_aligner",
    "register_aligner",
]
