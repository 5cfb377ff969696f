"""Reader and writer of the safetensors file format in torch + numpy (private).

The `safetensors` package is not a core dependency of cmda_data, but its file format is
the right one for banks and aligners: a JSON header and raw little-endian bytes, nothing
that can run code when loaded. The format is small enough to implement here:

    8 bytes   little-endian u64: N, the length of the header
    N bytes   JSON: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
                     "__metadata__": {str: str}}   (padded with spaces to a multiple of 8)
    rest      the tensors' bytes; offsets are relative to the start of this section

Files written here load with ``safetensors.torch.load_file`` and the other way round (the
tests check both directions against the package). Loading can memory-map the file: nothing
is read until used, and every process that maps the same file shares its page cache.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import numpy as np
import torch

from ..core._validation import fail
from ..exceptions import ValidationError

__all__ = ["load_file", "save_file"]

_TO_CODE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_FROM_CODE = {code: dtype for dtype, code in _TO_CODE.items()}
# numpy dtype used to view the raw bytes (bfloat16 has none: read as uint16, then reinterpret)
_NUMPY_VIEW = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024

PathLike = Union[str, Path]


def save_file(tensors: Mapping[str, torch.Tensor], path: PathLike,
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` (CPU or any device; copied to CPU) to ``path`` in safetensors format."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    # largest elements first, so every tensor starts at an offset aligned to its element size
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    blobs = []
    offset = 0
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            fail(f"tensors[{name!r}]", "a torch.Tensor", tensor)
        if tensor.dtype not in _TO_CODE:
            fail(f"tensors[{name!r}]", "a tensor of dtype " + ", ".join(str(d) for d in _TO_CODE), tensor)
        plain = tensor.detach().to("cpu").contiguous()
        flat = plain.reshape(-1)  # 0-d tensors cannot be viewed as bytes
        raw = flat.view(torch.uint8) if plain.dtype != torch.bool else flat.to(torch.uint8)
        data = raw.numpy().tobytes()
        header[name] = {"dtype": _TO_CODE[plain.dtype], "shape": list(plain.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for data in blobs:
            handle.write(data)


def read_header(path: PathLike) -> Dict[str, object]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets, metadata)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            fail(str(path), "a safetensors file (8-byte header length)", f"{len(head)} bytes",
                 ValidationError, raw=True)
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER:
            fail(str(path), f"a header of at most {_MAX_HEADER} bytes", f"{length} bytes", ValidationError, raw=True)
        text = handle.read(length)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        fail(str(path), "a valid safetensors JSON header", str(error), ValidationError, raw=True)
    header["__header_bytes__"] = 8 + length
    return header


def load_file(path: PathLike, *, mmap: bool = True) -> Dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file onto the CPU.

    Args:
        path: the file.
        mmap: map the file (copy-on-write, lazily read, page cache shared between
            processes); False reads everything into private memory.
    """
    header = read_header(path)
    start = int(header.pop("__header_bytes__"))
    header.pop("__metadata__", None)
    size = Path(path).stat().st_size
    raw = np.memmap(path, dtype=np.uint8, mode="c") if mmap else np.fromfile(path, dtype=np.uint8)
    out: Dict[str, torch.Tensor] = {}
    for name, info in header.items():
        try:
            code, shape = info["dtype"], [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            fail(f"{path}: tensor {name!r}", "dtype, shape and data_offsets", info, ValidationError)
        if code not in _FROM_CODE:
            fail(f"{path}: tensor {name!r}", "a dtype in " + ", ".join(_FROM_CODE), code, ValidationError)
        dtype = _FROM_CODE[code]
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * itemsize or start + end > size or begin < 0:
            fail(f"{path}: tensor {name!r}", f"{count * itemsize} bytes inside the file",
                 f"offsets [{begin}, {end}] in a file of {size} bytes", ValidationError, raw=True)
        chunk = raw[start + begin:start + end]
        if (start + begin) % itemsize:  # unaligned (a file written elsewhere): copy
            chunk = np.array(chunk)
        array = chunk.view(_NUMPY_VIEW[code])
        tensor = torch.from_numpy(array)
        if code == "BF16":
            tensor = tensor.view(torch.bfloat16)
        out[name] = tensor.reshape(shape)
    return out
