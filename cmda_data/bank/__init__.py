"""The embedding bank: every sample's latents and GMM responsibilities, computed once.

:class:`EmbeddingBank` is built from a dataset and an aligner (``EmbeddingBank.build``), saved and
loaded as safetensors, and looked up by dataset index by the entry points of
:mod:`cmda_data.augment`.
"""

from ._bank import EmbeddingBank

__all__ = ["EmbeddingBank"]
