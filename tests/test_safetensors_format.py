"""Our safetensors reader/writer against the `safetensors` package as the oracle."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys

import pytest
import torch

from cmda_data.exceptions import ValidationError
from cmda_data.io._safetensors import file_sha256, load_file, read_header, save_file

st = pytest.importorskip("safetensors.torch")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]


def _tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        base = torch.randn(3, i + 1, generator=g) * 50
        out[f"t{i}"] = base > 0 if dtype == torch.bool else base.to(dtype)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    return out


@pytest.mark.parametrize("mmap", [True, False])
def test_ours_written_package_read(tmp_path, mmap):
    tensors = _tensors()
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    theirs = st.load_file(str(tmp_path / "a.safetensors"))
    assert set(theirs) == set(tensors)
    for name, value in tensors.items():
        assert theirs[name].dtype == value.dtype and torch.equal(theirs[name], value), name
    ours = load_file(tmp_path / "a.safetensors", mmap=mmap)
    for name, value in tensors.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name
    assert read_header(tmp_path / "a.safetensors")["__metadata__"] == {"format": "pt"}


def test_package_written_ours_read(tmp_path):
    tensors = _tensors()
    st.save_file(tensors, str(tmp_path / "b.safetensors"))
    ours = load_file(tmp_path / "b.safetensors")
    for name, value in tensors.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name


def test_mmap_is_copy_on_write(tmp_path):
    save_file({"x": torch.arange(6.0)}, tmp_path / "c.safetensors")
    first = load_file(tmp_path / "c.safetensors", mmap=True)["x"]
    first += 100  # must not reach the file
    again = load_file(tmp_path / "c.safetensors", mmap=True)["x"]
    assert torch.equal(again, torch.arange(6.0))


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"x": torch.arange(100.0)}, path)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValidationError, match=r"expected tensor data of 392 bytes .* got tensors covering 400"):
        load_file(path)


def test_garbage_header_is_refused(tmp_path):
    path = tmp_path / "e.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(ValidationError, match="expected a valid safetensors JSON header"):
        load_file(path)


# -- the strict header (issue 14): each case was accepted before ------------------------------------
def _write_raw(path, header, data: bytes, pad: bool = True) -> None:
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, (list, tuple)) else shape,
            "data_offsets": list(offsets)}


@pytest.mark.parametrize("header, message", [
    ({"x": _entry(shape=[24.5])}, "a shape given as a list of non-negative integers, got \\[24.5\\]"),
    ({"x": _entry(shape=[2.0])}, "non-negative integers, got \\[2.0\\]"),
    ({"x": _entry(shape=[True, 2])}, "non-negative integers"),
    ({"x": _entry(shape=["2"])}, "non-negative integers"),
    ({"x": _entry(shape=[-2, -1])}, "non-negative integers"),
    ({"x": _entry(shape=2)}, "non-negative integers"),
    ({"x": _entry(dtype="F31")}, "expected a dtype in F64, F32"),
    ({"x": _entry(dtype=32)}, "expected a dtype in"),
    ({"x": _entry(offsets=[8, 0])}, "0 <= begin <= end"),
    ({"x": _entry(offsets=[-8, 0])}, "0 <= begin <= end"),
    ({"x": _entry(offsets=[0, 8, 16])}, "0 <= begin <= end"),
    ({"x": _entry(offsets=[0, 12])}, "expected 8 bytes \\(F32 of shape \\[2\\]\\)"),
    ({"x": _entry(), "y": _entry(offsets=[4, 12])}, "tensor 'y': expected data_offsets starting at 8"),
    ({"x": _entry(), "y": _entry()}, "tensor 'y': expected data_offsets starting at 8 \\(contiguous, no overlap"),
    ({"x": _entry(offsets=[8, 16])}, "tensor 'x': expected data_offsets starting at 0"),
    ({"x": _entry(shape=[1], offsets=[0, 4])}, "expected tensor data of 8 bytes"),
    ({"x": {"dtype": "F32", "shape": [2]}}, "exactly dtype, shape and data_offsets"),
    ({"x": dict(_entry(), extra=1)}, "exactly dtype, shape and data_offsets"),
    ({"x": [1, 2]}, "exactly dtype, shape and data_offsets"),
    ({"__metadata__": {"a": 1}, "x": _entry()}, "__metadata__: expected a JSON object of strings"),
])
def test_bad_headers_are_refused(tmp_path, header, message):
    path = tmp_path / "h.safetensors"
    _write_raw(path, header, bytes(8))
    with pytest.raises(ValidationError, match=message) as caught:
        load_file(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("text, message", [
    (b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "x": {"dtype": "F32", "shape": [2], '
     b'"data_offsets": [0, 8]}}', "duplicate name 'x'"),
    (b'{"x": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "NaN is not valid JSON"),
    (b"[1, 2]", "a JSON object as safetensors header, got list"),
    (b"\xff\xfe", "a valid safetensors JSON header"),
])
def test_bad_json_is_refused(tmp_path, text, message):
    path = tmp_path / "j.safetensors"
    _write_raw(path, text, bytes(8))
    with pytest.raises(ValidationError, match=message):
        load_file(path)


@pytest.mark.parametrize("length", [0, 1, 10 ** 12, 2 ** 64 - 1])
def test_header_length_must_fit_the_file(tmp_path, length):
    path = tmp_path / "n.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b"{}" + bytes(6))
    with pytest.raises(ValidationError, match="expected a header length in"):
        load_file(path)


def test_valid_edge_cases_still_load(tmp_path):
    """Zero-size tensors (begin == end), an empty file of tensors, any order of entries in the header."""
    path = tmp_path / "ok.safetensors"
    _write_raw(path, {"b": _entry(shape=[1], offsets=[4, 8]), "e": _entry(shape=[0, 3], offsets=[8, 8]),
                      "a": _entry(shape=[1], offsets=[0, 4])}, struct.pack("<2f", 1.5, 2.5))
    out = load_file(path)
    assert out["a"].tolist() == [1.5] and out["b"].tolist() == [2.5] and out["e"].shape == (0, 3)
    _write_raw(tmp_path / "none.safetensors", {}, b"")
    assert load_file(tmp_path / "none.safetensors") == {}


def test_save_returns_the_sha256_of_the_file_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "s.safetensors"
    digest = save_file({"x": torch.arange(1000.0), "flag": torch.tensor([True, False])}, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path, chunk=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_readonly_map_stops_a_write(tmp_path):
    """mmap="readonly": a write cannot reach the bytes (the OS stops the process); the file is unchanged."""
    path = tmp_path / "r.safetensors"
    save_file({"x": torch.arange(6.0)}, path)
    before = file_sha256(path)
    code = ("import sys, torch\nfrom cmda_data.io._safetensors import load_file\n"
            f"x = load_file({str(path)!r}, mmap='readonly')['x']\nprint(float(x.sum()), flush=True)\n"
            "x[0] = 5.0\nprint('written', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "15.0" and done.returncode != 0  # SIGSEGV: killed before 'written'
    assert file_sha256(path) == before


def test_mmap_option_is_checked(tmp_path):
    save_file({"x": torch.arange(2.0)}, tmp_path / "m.safetensors")
    with pytest.raises(ValidationError, match="mmap: expected True, False, 'copy' or 'readonly', got 'r'"):
        load_file(tmp_path / "m.safetensors", mmap="r")
