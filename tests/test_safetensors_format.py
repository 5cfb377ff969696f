"""Our safetensors reader/writer against the `safetensors` package as the oracle."""

from __future__ import annotations

import pytest
import torch

from cmda_data.io._safetensors import load_file, read_header, save_file
from cmda_data.exceptions import ValidationError

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
    with pytest.raises(ValidationError, match=r"tensor 'x': expected 400 bytes inside the file"):
        load_file(path)


def test_garbage_header_is_refused(tmp_path):
    path = tmp_path / "e.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(ValidationError, match="expected a valid safetensors JSON header"):
        load_file(path)
