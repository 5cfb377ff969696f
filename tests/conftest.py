"""Shared fixtures: devices by mark, the real data folder, hypothesis profiles."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# benchmark-only code (encoders, the host-read counter) lives in benchmarks/, next to its scripts
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile("dev", max_examples=20, deadline=None)
    settings.register_profile("thorough", max_examples=500, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    pass

REPO_ROOT = Path(__file__).resolve().parents[1]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: parametrize a test over devices: ``@pytest.mark.parametrize("device", CPU_AND_CUDA)``
CPU_AND_CUDA = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.needs_cuda, needs_cuda]),
]


def data_root() -> Path:
    """``$CMDA_DATA_DIR`` or ``<repo>/../shared/data``."""
    override = os.environ.get("CMDA_DATA_DIR")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data"


def require_data(*relative: str) -> Path:
    """Return the data folder (or a file in it); skip, or fail under ``CMDA_REQUIRE_DATA=1``."""
    path = data_root().joinpath(*relative)
    if not path.exists():
        message = f"real data not found at {path} (set CMDA_DATA_DIR to the shared/data folder)"
        if os.environ.get("CMDA_REQUIRE_DATA") == "1":
            pytest.fail(message + "; CMDA_REQUIRE_DATA=1 makes this a failure")
        pytest.skip(message)
    return path


@pytest.fixture
def data_dir() -> Path:
    """The real data folder (``../shared/data``)."""
    return require_data()


@pytest.fixture
def wikipedia_dir() -> Path:
    return require_data("wikipedia")


@pytest.fixture
def webnews_dir() -> Path:
    return require_data("webnews")


@pytest.fixture(autouse=True)
def _no_global_rng_leaks():
    """Every test starts from the same global RNG state (our code must not depend on it)."""
    torch.manual_seed(1234)
    yield
