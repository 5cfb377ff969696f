"""Hypothesis strategies shared by the whole test suite (the ONE strategies file).

Layout: one section per owner, separated by a banner comment. Other helpers may append a
section at the end of the file (``# === <topic> (owner: <helper>) ===``); please do not
edit the sections of others. Every strategy yields torch tensors on the CPU; tests move
them to the device they are parametrised with.

Sections:
    1. sizes and dtypes            (owner: functional helper)
    2. latents and responsibilities (owner: functional helper)
    3. weights and samples          (owner: functional helper)
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = [
    "BATCH_SIZES",
    "FLOAT_DTYPES",
    "batch_sizes",
    "dense_weights",
    "float_dtypes",
    "latent_pairs",
    "latents",
    "responsibilities",
    "sample_tensors",
    "sparse_weights",
    "trailing_shapes",
]

# =====================================================================================
# 1. sizes and dtypes (owner: functional helper)
# =====================================================================================

#: batch sizes worth testing explicitly: 1, odd numbers, a power of two
BATCH_SIZES = (1, 2, 3, 5, 7, 8)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def batch_sizes(max_size: int = 9) -> st.SearchStrategy[int]:
    """Batch sizes from 1 to ``max_size``; shrinks towards 1 and always tries odd sizes."""
    return st.one_of(st.sampled_from([1, 3, 5, 7]), st.integers(1, max_size))


def float_dtypes(low_precision: bool = True) -> st.SearchStrategy[torch.dtype]:
    """float32 / float64, plus float16 / bfloat16 unless ``low_precision`` is False."""
    choices = FLOAT_DTYPES if low_precision else (torch.float32, torch.float64)
    return st.sampled_from(choices)


def trailing_shapes() -> st.SearchStrategy[tuple]:
    """Trailing sample shapes: scalar (), a vector (d,), an image (c, h, w), and odd ones."""
    return st.one_of(
        st.just(()),
        st.tuples(st.integers(1, 6)),
        st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
        st.tuples(st.integers(1, 2), st.integers(1, 3)),
    )


def _array(shape, low: float, high: float) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float64, shape, elements=st.floats(low, high, allow_nan=False,
                                                            allow_infinity=False, width=32))


# =====================================================================================
# 2. latents and responsibilities (owner: functional helper)
# =====================================================================================


@st.composite
def latents(draw, n: int | None = None, d: int | None = None, dtype: torch.dtype = torch.float32):
    """A latent matrix ``[n, d]`` with finite entries in [-10, 10] (zero rows allowed)."""
    n = draw(batch_sizes()) if n is None else n
    d = draw(st.integers(1, 6)) if d is None else d
    return torch.from_numpy(draw(_array((n, d), -10.0, 10.0))).to(dtype)


@st.composite
def latent_pairs(draw, square: bool = False, dtype: torch.dtype = torch.float32):
    """``(teacher_z [n, d], student_z [m, d])`` with a shared latent dimension."""
    n = draw(batch_sizes())
    m = n if square else draw(batch_sizes())
    d = draw(st.integers(1, 6))
    return draw(latents(n, d, dtype)), draw(latents(m, d, dtype))


@st.composite
def responsibilities(draw, n: int | None = None, components: int | None = None,
                     dtype: torch.dtype = torch.float32):
    """GMM posteriors ``[n, M]``: non-negative rows that sum to 1 (some one-hot)."""
    n = draw(batch_sizes()) if n is None else n
    m = draw(st.integers(1, 4)) if components is None else components
    raw = draw(_array((n, m), 0.0, 1.0)) + draw(st.sampled_from([0.0, 1e-3]))
    raw[raw.sum(1) == 0, 0] = 1.0
    return torch.from_numpy(raw / raw.sum(1, keepdims=True)).to(dtype)


# =====================================================================================
# 3. weights and samples (owner: functional helper)
# =====================================================================================


@st.composite
def dense_weights(draw, n: int | None = None, m: int | None = None, stochastic: bool = True,
                  dtype: torch.dtype = torch.float32):
    """Non-negative weights ``[n, m]``, with zeros; rows sum to 1 when ``stochastic``."""
    n = draw(batch_sizes()) if n is None else n
    m = draw(batch_sizes()) if m is None else m
    raw = draw(_array((n, m), 0.0, 1.0))
    raw[raw.sum(1) == 0, draw(st.integers(0, m - 1))] = 1.0
    if stochastic:
        raw = raw / raw.sum(1, keepdims=True)
    return torch.from_numpy(raw).to(dtype)


@st.composite
def sparse_weights(draw, n: int, m: int, k: int | None = None):
    """``(index [n, k] int64, weights [n, k] float32)``: rows sum to 1, repeats allowed."""
    k = draw(st.integers(1, m + 2)) if k is None else k
    index = torch.from_numpy(draw(hnp.arrays(np.int64, (n, k), elements=st.integers(0, m - 1))))
    raw = draw(_array((n, k), 0.0, 1.0))
    raw[raw.sum(1) == 0, 0] = 1.0
    return index, torch.from_numpy(raw / raw.sum(1, keepdims=True)).float()


@st.composite
def sample_tensors(draw, m: int | None = None, dtype: torch.dtype | None = None,
                   shape: tuple | None = None):
    """Samples ``[m, *S]`` of a varied trailing shape ``S``, values in [-100, 100]."""
    m = draw(batch_sizes()) if m is None else m
    trailing = draw(trailing_shapes()) if shape is None else shape
    dtype = draw(float_dtypes()) if dtype is None else dtype
    values = torch.from_numpy(draw(_array((m, *trailing), -100.0, 100.0)))
    return values.to(dtype)
