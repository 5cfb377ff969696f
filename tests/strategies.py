"""Hypothesis strategies shared by the whole test suite (the ONE strategies file).

Layout: one section per owner, separated by a banner comment. Other helpers may append a
section at the end of the file (``# === <topic> (owner: <helper>) ===``); please do not
edit the sections of others. Every strategy yields torch tensors on the CPU; tests move
them to the device they are parametrised with.

Sections:
    1. sizes and dtypes            (owner: functional helper)
    2. latents and responsibilities (owner: functional helper)
    3. weights and samples          (owner: functional helper)
    4. extreme values, bad arguments and devices (owner: reliability helper, tests/fuzz/)
    5. webdataset shards: samples, cuts and member edits (owner: shards helper)
    6. saved bank files: bit flips, truncations, header edits (owner: bank-file helper)
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = [
    "BAD_SCALARS",
    "BATCH_SIZES",
    "EXTREME_MAGNITUDES",
    "FLOAT_DTYPES",
    "SHARD_FIELDS",
    "bad_scalars",
    "bit_flips",
    "batch_sizes",
    "cut_points",
    "dense_weights",
    "devices_with_meta",
    "extreme_floats",
    "extreme_tensors",
    "float_dtypes",
    "header_edits",
    "json_values",
    "latent_pairs",
    "latents",
    "member_edits",
    "responsibilities",
    "sample_tensors",
    "shard_samples",
    "sparse_weights",
    "stochastic_rows",
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


# =====================================================================================
# 4. extreme values, bad arguments and devices (owner: reliability helper, tests/fuzz/)
# =====================================================================================

#: magnitudes at the edges of each dtype: subnormal, tiny normal, huge (overflow of squares and sums)
EXTREME_MAGNITUDES = {
    torch.float16: (6e-8, 6.1e-5, 1.0, 3e4, 6.5e4),
    torch.bfloat16: (1e-40, 1e-38, 1.0, 1e38, 3e38),
    torch.float32: (1e-45, 1e-40, 1e-38, 1.0, 1e20, 1e38, 3e38),
    torch.float64: (5e-324, 1e-310, 1e-300, 1.0, 1e20, 1e200, 1e300, 1e308),
}


def extreme_floats(dtype: torch.dtype = torch.float32, *, finite: bool = True,
                   nonnegative: bool = False) -> st.SearchStrategy[float]:
    """Numbers at the edges of ``dtype``: subnormal, 1e+-38 (float32), 1e+-300 (float64), -0.0,
    0.0, ordinary values and (unless ``finite``) inf, -inf and NaN. Every value is exact in ``dtype``.
    """
    width = {torch.float16: 16, torch.float64: 64}.get(dtype, 32)
    scale = st.sampled_from(EXTREME_MAGNITUDES[dtype])
    edges = st.builds(lambda m, u, s: s * m * (1.0 + u), scale, st.floats(0.0, 0.5), st.sampled_from([1.0, -1.0]))
    ordinary = st.floats(-1e3, 1e3, width=width)
    pool = [edges, ordinary, st.sampled_from([0.0, -0.0, 1.0])]
    if not finite:
        pool.append(st.sampled_from([float("inf"), float("-inf"), float("nan")]))
    values = st.one_of(*pool)
    if nonnegative:
        values = values.map(abs)
    return values.map(lambda v: torch.tensor(v, dtype=torch.float64).to(dtype).item()
                      if dtype != torch.float64 else v).filter(lambda v: finite is False or np.isfinite(v))


@st.composite
def extreme_tensors(draw, shape: tuple, dtype: torch.dtype | None = None, *, finite: bool = True,
                    nonnegative: bool = False, same_scale: bool | None = None) -> torch.Tensor:
    """A tensor of ``shape`` drawn from :func:`extreme_floats` (one magnitude for all entries when
    ``same_scale``: a row of huge values then really overflows a sum)."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64])) if dtype is None else dtype
    same_scale = draw(st.booleans()) if same_scale is None else same_scale
    size = int(np.prod(shape)) if shape else 1
    if same_scale:
        magnitude = draw(st.sampled_from(EXTREME_MAGNITUDES[dtype]))
        unit = draw(hnp.arrays(np.float64, size, elements=st.floats(0.0, 1.0)))
        values = magnitude * (0.5 + 0.5 * unit)
        if not nonnegative:
            values = values * draw(hnp.arrays(np.float64, size, elements=st.sampled_from([1.0, -1.0])))
        tensor = torch.from_numpy(values).to(dtype)
    else:
        values = draw(st.lists(extreme_floats(dtype, finite=finite, nonnegative=nonnegative),
                               min_size=size, max_size=size))
        tensor = torch.tensor(values, dtype=torch.float64).to(dtype)
    tensor = tensor.reshape(shape)
    if finite:
        assume_finite = torch.isfinite(tensor).all()
        if not bool(assume_finite):  # a magnitude rounded up to inf in dtype: bring it back to max
            tensor = torch.nan_to_num(tensor, posinf=torch.finfo(dtype).max, neginf=-torch.finfo(dtype).max)
    return tensor


@st.composite
def stochastic_rows(draw, n: int, m: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Convex weights ``[n, m]`` (non-negative, rows sum to 1) with some subnormal and zero entries."""
    raw = draw(extreme_tensors((n, m), torch.float64, nonnegative=True, same_scale=False))
    raw = raw / raw.amax(1, keepdim=True).clamp_min(1e-300)
    raw[raw.sum(1) == 0, 0] = 1.0
    return (raw / raw.sum(1, keepdim=True)).to(dtype)


#: values that are wrong for most arguments: wrong types, out of range, non-finite, huge
BAD_SCALARS = (None, True, "1", b"1", 1j, -1, 0, 10 ** 20, 1e20, -1e-300, float("nan"), float("inf"),
               float("-inf"), [], {}, object())


def bad_scalars() -> st.SearchStrategy:
    """A value from :data:`BAD_SCALARS`, a numpy scalar or a 0-d tensor (some on the meta device)."""
    return st.one_of(
        st.sampled_from(BAD_SCALARS),
        st.sampled_from([np.float32(np.nan), np.int64(-3), np.float64(1e300), np.complex64(1j)]),
        st.sampled_from([torch.tensor(0.5), torch.tensor(-2), torch.tensor(float("nan")),
                         torch.tensor(1.0, device="meta"), torch.tensor([1, 2])]),
    )


def devices_with_meta() -> st.SearchStrategy[str]:
    """``"cpu"`` or ``"meta"`` (a tensor without data); tests add ``"cuda"`` by mark."""
    return st.sampled_from(["cpu", "meta"])


# =====================================================================================
# 5. webdataset shards: samples, cuts and member edits (owner: shards helper,
#    tests/fuzz/test_fuzz_shards.py)
# =====================================================================================

#: the fields a fuzzed shard sample may declare (write_shards adds "index")
SHARD_FIELDS = ("image", "label", "caption", "meta")


@st.composite
def shard_samples(draw, max_samples: int = 9):
    """``(samples, fields)``: 1..``max_samples`` dict samples that all have the declared ``fields``.

    ``image`` a float32 tensor of 0 to 3 dimensions (sizes 0..3), ``label`` an int, ``caption``
    any text (also empty), ``meta`` a small JSON dict.
    """
    fields = draw(st.lists(st.sampled_from(SHARD_FIELDS), min_size=1, unique=True))
    samples = []
    for _ in range(draw(st.integers(1, max_samples))):
        sample = {}
        if "image" in fields:
            shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
            array = draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
            sample["image"] = torch.from_numpy(array)
        if "label" in fields:
            sample["label"] = draw(st.integers(-(2 ** 62), 2 ** 62))
        if "caption" in fields:
            sample["caption"] = draw(st.text(max_size=30))
        if "meta" in fields:
            sample["meta"] = draw(st.dictionaries(st.text(max_size=4), st.integers(-9, 9) | st.booleans() | st.none(),
                                                  max_size=3))
        samples.append(sample)
    return samples, fields


def cut_points(size: int, members) -> st.SearchStrategy[int]:
    """Byte offsets ``< size`` to cut a tar at: member boundaries, inside headers, inside data, anywhere.

    ``members``: ``(header offset, data offset, data end)`` of every member.
    """
    boundaries = sorted({x for header, start, end in members for x in (header, start, end + (-end % 512))}
                        | {0})
    inside = sorted({x for header, start, end in members
                     for x in (header + 1, header + 257, (start + end) // 2, max(start, end - 1))})
    return st.one_of(st.sampled_from([x for x in boundaries if x < size]),
                     st.sampled_from([x for x in inside if x < size]),
                     st.integers(0, size - 1))


@st.composite
def member_edits(draw, n: int, fields):
    """``(extra, missing)``: samples that get an extra member, and sample -> fields whose members go.

    At most ``len(fields) - 1`` members of a sample go, so every sample keeps a member.
    """
    extra = draw(st.sets(st.integers(0, n - 1), max_size=n))
    missing = draw(st.dictionaries(st.integers(0, n - 1),
                                   st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=len(fields) - 1,
                                            unique=True), max_size=n))
    return extra, missing


# =====================================================================================
# 6. saved bank files: bit flips, truncations, header edits (owner: bank-file helper,
#    tests/fuzz/test_fuzz_bank.py)
# =====================================================================================

def bit_flips(size: int) -> st.SearchStrategy[tuple]:
    """``(byte position, bit)`` in a file of ``size`` bytes: anywhere, or in its first 256 bytes
    (the length field and the header, where a flip changes the structure)."""
    return st.tuples(st.integers(0, size - 1) | st.integers(0, min(size, 256) - 1), st.integers(0, 7))


#: any JSON value a hand-edited or damaged header may hold
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 65), 2 ** 65) | st.integers(-2, 64)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6) | st.sampled_from(["F32", "F64", "I64", "U8"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


@st.composite
def header_edits(draw, names):
    """``(tensor name, field, value)``: one field of one safetensors header entry set to ``value``;
    the field may be ``dtype``, ``shape``, ``data_offsets`` or an unknown one."""
    name = draw(st.sampled_from(sorted(names)))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
    value = draw(json_values | st.lists(st.integers(-2, 64), max_size=4))
    return name, field, value
