"""cmda_data: Cross-modal Data Augmentation (CMDA) for any PyTorch training loop.

New samples of a *student* modality are convex combinations of real student samples,
weighted by how well each student sample matches a *teacher* sample in a shared latent
space (Eq. 10) and by Gaussian-mixture cluster relations (Eq. 11, "DCA").

The public names are imported on first use, so ``import cmda_data`` pulls in torch and
numpy only (never transformers or webdataset).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first attribute access)
_EXPORTS = {
    "BankFormatError": ".exceptions",
    "CMDAError": ".exceptions",
    "CMDAWarning": ".exceptions",
    "ConvergenceWarning": ".exceptions",
    "DeviceError": ".exceptions",
    "FieldError": ".exceptions",
    "MissingDependencyError": ".exceptions",
    "NotFittedError": ".exceptions",
    "ShapeError": ".exceptions",
    "SkippedSamplesWarning": ".exceptions",
    "ValidationError": ".exceptions",
    "MixOptions": ".options",
    "ImageField": ".core._fields",
    "MixPlan": ".core.plan",
    "make_plan": ".core.build",
    "GaussianMixture": ".core.mixture",
    "select_n_components": ".core.mixture",
    "Aligner": ".aligners",
    "CLIPAligner": ".aligners",
    "ContrastiveAligner": ".aligners",
    "OpenCLIPAligner": ".aligners",
    "PrecomputedAligner": ".aligners",
    "create_aligner": ".aligners",
    "list_aligners": ".aligners",
    "load_aligner": ".aligners",
    "register_aligner": ".aligners",
    "EmbeddingBank": ".bank",
    "CrossModalAugmentedDataset": ".augment.dataset",
    "IndexedDataset": ".augment.dataset",
    "CMDACollate": ".augment.collate",
    "CMDAugment": ".augment.module",
    "CandidateBuffer": ".augment.buffer",
    "read_shards": ".io.shards",
    "write_shards": ".io.shards",
    "build_bank_distributed": ".distributed",
}

# subpackages and public modules, imported on first attribute access (``cmda_data.core.functional``)
_SUBMODULES = ("aligners", "augment", "bank", "controls", "core", "datasets", "distributed", "io", "options",
               "stats")

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module("." + name, __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cmda_data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
