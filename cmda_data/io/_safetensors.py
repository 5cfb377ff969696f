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

import hashlib
import json
import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ..core._validation import fail
from ..exceptions import ValidationError

__all__ = ["MMAP_MODES", "RawFile", "check_mmap", "file_sha256", "load_file", "read_header", "save_file"]

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
_ITEMSIZE = {code: torch.empty((), dtype=dtype).element_size() for code, dtype in _FROM_CODE.items()}
_MAX_HEADER = 100 * 1024 * 1024
#: bytes per read when a RawFile is copied into a safetensors file (one reused buffer)
_RAW_BLOCK = 1 << 23

PathLike = Union[str, Path]


@dataclass(frozen=True)
class RawFile:
    """A tensor that lives in a raw file (its bytes in C order, little-endian, nothing else).

    :func:`save_file` copies it into the safetensors file block by block, so a table larger than
    the memory can be written without being loaded.
    """

    path: Path
    dtype: torch.dtype
    shape: Tuple[int, ...]

    def element_size(self) -> int:
        return _ITEMSIZE[_TO_CODE[self.dtype]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.element_size()


def save_file(tensors: Mapping[str, Union[torch.Tensor, RawFile]], path: PathLike,
              metadata: Optional[Mapping[str, str]] = None, *, progress: bool = False) -> str:
    """Write ``tensors`` (CPU or any device; copied to CPU) to ``path`` in safetensors format.

    A value may also be a :class:`RawFile`: its bytes are copied from that file in blocks (the
    file must hold exactly ``prod(shape) x itemsize`` bytes). The file is written beside ``path``
    under a temporary name, synced and renamed when complete, so ``path`` never holds half a
    file. Returns the SHA-256 hex digest of the bytes written.
    ``progress=True`` shows a tqdm bar (in bytes) when the write takes over two seconds.
    """
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, tensor in tensors.items():
        if not isinstance(tensor, (torch.Tensor, RawFile)):
            fail(f"tensors[{name!r}]", "a torch.Tensor", tensor)
        if tensor.dtype not in _TO_CODE:
            fail(f"tensors[{name!r}]", "a tensor of dtype " + ", ".join(str(d) for d in _TO_CODE), tensor)
    # largest elements first, so every tensor starts at an offset aligned to its element size
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    blobs: list = []
    offset = 0
    for name, tensor in items:
        if isinstance(tensor, RawFile):
            size = Path(tensor.path).stat().st_size
            if size != tensor.nbytes:
                fail(f"tensors[{name!r}]", f"a raw file of {tensor.nbytes} bytes ({_TO_CODE[tensor.dtype]} of shape "
                     f"{list(tensor.shape)})", f"{size} bytes in {tensor.path}", ValidationError, raw=True)
            header[name] = {"dtype": _TO_CODE[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + size]}
            blobs.append(tensor)
            offset += size
            continue
        plain = tensor.detach().to("cpu").contiguous()
        flat = plain.reshape(-1)  # 0-d tensors cannot be viewed as bytes
        data = (flat.view(torch.uint8) if plain.dtype != torch.bool else flat.to(torch.uint8)).numpy()
        header[name] = {"dtype": _TO_CODE[plain.dtype], "shape": list(plain.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        blobs.append(data)
        offset += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "wb") as handle:
            for block in _write_blocks([struct.pack("<Q", len(text)), text] + blobs, progress):  # no copies
                handle.write(block)
                digest.update(block)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename: a crash leaves the old file or the new one
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return digest.hexdigest()


def _write_blocks(blocks: list, progress: bool, size: int = 1 << 26):
    """The blocks to write, cut into views of at most ``size`` bytes, behind an optional tqdm bar.

    A :class:`RawFile` block is read from its file into one reused buffer of at most
    ``_RAW_BLOCK`` bytes (each piece is consumed before the next is read).
    """
    total = sum(b.nbytes if isinstance(b, RawFile) else memoryview(b).nbytes for b in blocks)
    pieces = (piece for block in blocks for piece in _pieces(block, size))
    if not progress:
        return pieces
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return pieces
    bar = tqdm(total=total, desc="save", unit="B", unit_scale=True, delay=2.0)

    def counted():
        for piece in pieces:
            yield piece
            bar.update(piece.nbytes)
        bar.close()
    return counted()


def _pieces(block: object, size: int) -> Iterator[memoryview]:
    if not isinstance(block, RawFile):
        view = memoryview(block).cast("B")
        yield from (view[i:i + size] for i in range(0, max(1, len(view)), size))
        return
    buffer = memoryview(bytearray(min(size, _RAW_BLOCK, max(1, block.nbytes))))
    with open(block.path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                return
            yield buffer[:count]


def read_header(path: PathLike) -> Dict[str, object]:
    """The JSON header of a safetensors file, checked strictly against the file.

    Every tensor entry must hold exactly ``dtype`` (a known code), ``shape`` (a list of
    non-negative integers: ``24.5``, ``24.0``, ``true`` and ``"24"`` are refused) and
    ``data_offsets`` (two integers ``0 <= begin <= end``) with ``end - begin`` equal to
    ``prod(shape) x itemsize``; sorted by offset the tensors must cover the data section
    exactly (contiguous, no overlap, no hole, nothing after the last one), as the format
    requires. Names appear once. ``"__header_bytes__"`` is added: where the data section starts.

    Raises:
        ValidationError: the message names the file, the tensor and what is wrong.
    """
    size = Path(path).stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            fail(str(path), "a safetensors file (8-byte header length)", f"{len(head)} bytes",
                 ValidationError, raw=True)
        (length,) = struct.unpack("<Q", head)
        if length < 2 or length > _MAX_HEADER or 8 + length > size:
            fail(str(path), f"a header length in [2, {min(_MAX_HEADER, size - 8)}] bytes (file of {size} bytes)",
                 f"{length} bytes", ValidationError, raw=True)
        text = handle.read(length)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as error:
        fail(str(path), "a valid safetensors JSON header", str(error), ValidationError, raw=True)
    if not isinstance(header, dict):
        fail(str(path), "a JSON object as safetensors header", type(header).__name__, ValidationError, raw=True)
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        fail(f"{path}: __metadata__", "a JSON object of strings", metadata, ValidationError)
    spans = sorted((_check_entry(path, name, info), name) for name, info in header.items() if name != "__metadata__")
    position = 0
    for (begin, end), name in spans:
        if begin != position:
            fail(f"{path}: tensor {name!r}", f"data_offsets starting at {position} (contiguous, no overlap)",
                 f"[{begin}, {end}]", ValidationError, raw=True)
        position = end
    if 8 + length + position != size:
        fail(str(path), f"tensor data of {size - 8 - length} bytes (the rest of the file)",
             f"tensors covering {position} bytes", ValidationError, raw=True)
    header["__header_bytes__"] = 8 + length
    return header


def _unique_keys(pairs: list) -> Dict[str, object]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate name " + repr(next(k for k in keys if keys.count(k) > 1)))
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _check_entry(path: PathLike, name: str, info: object) -> Tuple[int, int]:
    """``(begin, end)`` of one tensor entry, every field checked."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        fail(where, "an object with exactly dtype, shape and data_offsets", info, ValidationError)
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in _FROM_CODE:
        fail(where, "a dtype in " + ", ".join(_FROM_CODE), code, ValidationError)
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        fail(where, "a shape given as a list of non-negative integers", shape, ValidationError)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        fail(where, "data_offsets [begin, end] with integers 0 <= begin <= end", offsets, ValidationError)
    nbytes = math.prod(shape) * _ITEMSIZE[code]
    if offsets[1] - offsets[0] != nbytes:
        fail(where, f"{nbytes} bytes ({code} of shape {shape})", f"data_offsets {offsets}", ValidationError, raw=True)
    return offsets[0], offsets[1]


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks of ``chunk`` bytes (memory stays flat).

    Examples:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     name = os.path.join(folder, "f")
        ...     _ = open(name, "wb").write(b"abc")
        ...     file_sha256(name)[:16]
        'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)


#: memory-map modes of :func:`load_file`: numpy memmap mode of each accepted ``mmap`` value
MMAP_MODES = {True: "c", "copy": "c", "readonly": "r"}


def check_mmap(mmap: object) -> None:
    """Check the ``mmap`` argument of :func:`load_file` (and of the loaders that pass it on)."""
    if not (mmap is False or (isinstance(mmap, (bool, str)) and mmap in MMAP_MODES)):
        fail("mmap", "True, False, 'copy' or 'readonly'", mmap)


def load_file(path: PathLike, *, mmap: Union[bool, str] = True) -> Dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file onto the CPU (header checked by :func:`read_header`).

    Args:
        path: the file.
        mmap: ``True`` or ``"copy"``: map the file copy-on-write (lazily read; the page cache
            is shared by every process that maps the file; a write to a tensor stays in the
            writing process and never reaches the file). ``"readonly"``: map it read-only
            (a write is stopped by the operating system: the process gets SIGSEGV, since
            torch tensors cannot be flagged read-only). ``False``: read it into private memory.
    """
    check_mmap(mmap)
    header = read_header(path)
    start = int(header.pop("__header_bytes__"))
    header.pop("__metadata__", None)
    if mmap is False:
        raw = np.fromfile(path, dtype=np.uint8)
    else:
        raw = np.memmap(path, dtype=np.uint8, mode=MMAP_MODES[mmap])
    out: Dict[str, torch.Tensor] = {}
    for name, info in header.items():
        code, shape = info["dtype"], info["shape"]
        begin, end = info["data_offsets"]
        chunk = raw[start + begin:start + end]
        if (start + begin) % _ITEMSIZE[code]:  # unaligned (a file written elsewhere): copy
            chunk = np.array(chunk)
        array = chunk.view(_NUMPY_VIEW[code])
        with warnings.catch_warnings():  # a read-only map: torch warns that it is not writable
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(array)
        if code == "BF16":
            tensor = tensor.view(torch.bfloat16)
        out[name] = tensor.reshape(shape)
    return out
