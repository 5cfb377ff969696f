"""Shard members without pickle: encoding, decoding, :class:`SafeDecoder`, :class:`SkipCounter` (private).

:func:`cmda_data.io.shards.read_shards` decodes with them.

A webdataset shard is a tar file whose members are named ``<key>.<field>.<ext>``. This
module turns one field value into the bytes of a member (:func:`encode_field`) and the
bytes of a member back into a value (:func:`decode_member`). Only formats that cannot run
code are used: ``.npy`` (read with ``allow_pickle=False``), ``.json``, ``.txt``, ``.cls``
and, on request, images through Pillow. Extensions of pickle-based formats are listed in
:data:`UNSAFE_EXTENSIONS` and are never decoded. :class:`SafeDecoder` applies this to whole
samples; :class:`SkipCounter` is the webdataset handler that counts what was skipped.
"""

from __future__ import annotations

import gzip
import io
import json
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..core._validation import check_int, check_option, describe, fail
from ..exceptions import MissingDependencyError, SkippedSamplesWarning, ValidationError

__all__ = [
    "IMAGE_EXTENSIONS",
    "UNSAFE_EXTENSIONS",
    "SafeDecoder",
    "SkipCounter",
    "SkippedSamplesWarning",
    "decode_member",
    "encode_field",
    "split_member",
]

#: member extensions whose standard decoders unpickle (run code): refused, never decoded
UNSAFE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib", "dill"})
#: extensions decoded as images when an image spec is given
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm"})
#: image specs: name -> (PIL mode, output kind)
IMAGE_SPECS = {
    "torchrgb": ("RGB", "float"),
    "torchrgb8": ("RGB", "uint8"),
    "torchl": ("L", "float"),
    "torchl8": ("L", "uint8"),
    "pil": ("RGB", "pil"),
}
_INT_EXTENSIONS = frozenset({"cls", "cls2", "index", "inx", "id"})
_TEXT_EXTENSIONS = frozenset({"txt", "text"})
_JSON_EXTENSIONS = frozenset({"json", "jsn"})
_GZ_LIMIT = 1 << 30  # 1 GiB per decompressed member


# --------------------------------------------------------------------------- encoding
def _npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


def default_extension(value: Any) -> Optional[str]:
    """The extension a value is stored under when none is given (None: no default)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return "npy"
    if isinstance(value, bool):
        return "json"
    if isinstance(value, (int, np.integer)):
        return "cls"
    if isinstance(value, str):
        return "txt"
    if value is None or isinstance(value, (float, np.floating, dict, list, tuple)):
        return "json"
    return None


def encode_field(name: str, value: Any, ext: Optional[str],
                 encoders: Optional[Mapping[str, Callable[[Any], bytes]]] = None) -> Tuple[str, bytes]:
    """``(ext, bytes)`` of one field value.

    Tensors and arrays become ``.npy`` (no object arrays, no bfloat16), ints ``.cls``,
    strings ``.txt``, floats / bools / lists / dicts ``.json``. ``bytes`` are stored as
    they are under the extension given. ``encoders`` maps extra extensions to
    ``value -> bytes`` functions.

    Examples:
        >>> encode_field("label", 3, None)
        ('cls', b'3')
        >>> encode_field("caption", "a red square", None)
        ('txt', b'a red square')
    """
    ext = default_extension(value) if ext is None else ext
    where = f"field {name!r}"
    if ext is None:
        fail(where, "a tensor, array, int, str, float, bool, list or dict (or an extension in "
             "fields= with an encoder in encoders=)", value)
    if ext in UNSAFE_EXTENSIONS:
        fail(where, "a non-pickle extension (npy, json, txt, cls, an image type, ...)", f".{ext}", raw=True)
    if encoders and ext in encoders:
        data = encoders[ext](value)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            fail(f"encoders[{ext!r}]", "a function returning bytes", data)
        return ext, bytes(data)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ext, bytes(value)
    if ext == "npy":
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bfloat16:
                fail(where, "a tensor with a numpy dtype (bfloat16 has none: convert it to float32)", value)
            value = value.detach().cpu().numpy()
        if not isinstance(value, np.ndarray) or value.dtype.hasobject:
            fail(where, "a tensor or a numeric numpy array for a .npy member", value)
        return ext, _npy_bytes(value)
    if ext in _INT_EXTENSIONS:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            fail(where, f"an int for a .{ext} member", value)
        return ext, str(int(value)).encode("ascii")
    if ext in _TEXT_EXTENSIONS:
        if not isinstance(value, str):
            fail(where, f"a str for a .{ext} member", value)
        return ext, value.encode("utf-8")
    if ext in _JSON_EXTENSIONS:
        if isinstance(value, (np.integer, np.floating)):
            value = value.item()
        try:
            return ext, json.dumps(value, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as error:
            fail(where, "a JSON-serialisable value (finite floats)", f"{describe(value)}: {error}", raw=True)
    fail(where, f"bytes or an encoder in encoders= for extension {ext!r}", value)


# --------------------------------------------------------------------------- decoding
def split_member(name: str) -> Tuple[str, str]:
    """``(field, ext)`` of a member suffix such as ``"image.npy"`` (the last dot splits).

    Examples:
        >>> split_member("image.npy"), split_member("index.cls"), split_member("seg.mask.png")
        (('image', 'npy'), ('index', 'cls'), ('seg.mask', 'png'))
        >>> split_member("npy")
        ('npy', 'npy')
    """
    if not isinstance(name, str):
        fail("member", "a member name (a str such as 'image.npy')", name)
    field, dot, ext = name.rpartition(".")
    if not dot:
        return name, name.lower()
    return field, ext.lower()


def _read_npy(data: bytes) -> torch.Tensor:
    array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array).copy()
    return torch.from_numpy(array)


def _read_image(data: bytes, spec: str) -> Any:
    try:
        import PIL.Image
    except ImportError as error:  # pragma: no cover - pillow comes with matplotlib
        fail("image", "the package 'pillow' to decode images (pip install pillow)", repr(error),
             MissingDependencyError, raw=True)
    mode, kind = IMAGE_SPECS[spec]
    with io.BytesIO(data) as stream:
        image = PIL.Image.open(stream)
        image.load()
        image = image.convert(mode)
    if kind == "pil":
        return image
    array = np.asarray(image)
    tensor = torch.from_numpy(array.copy())
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()
    return tensor.float().div_(255.0) if kind == "float" else tensor


def decode_member(ext: str, data: bytes, *, image: Optional[str] = None) -> Any:
    """Decode the bytes of one member by extension; unknown extensions stay bytes.

    Raises ``ValueError`` (or another builtin error) for corrupt data; callers wrap it.
    Never called for :data:`UNSAFE_EXTENSIONS`.

    Examples:
        >>> decode_member("cls", b"7"), decode_member("json", b"[1, 2]")
        (7, [1, 2])
        >>> decode_member("npy", encode_field("x", torch.tensor([1.5, 2.5]), None)[1])
        tensor([1.5000, 2.5000])
    """
    if ext in UNSAFE_EXTENSIONS:  # defensive: the decoder filters these out first
        raise ValidationError(f"member: expected a non-pickle extension, got .{ext}")
    if ext == "gz":
        raise ValidationError("member: expected the inner extension after .gz (use decode_gz)")
    if ext == "npy":
        return _read_npy(data)
    if ext in _INT_EXTENSIONS:
        return int(data.decode("ascii").strip())
    if ext in _TEXT_EXTENSIONS:
        return data.decode("utf-8")
    if ext in _JSON_EXTENSIONS:
        return json.loads(data.decode("utf-8"))
    if image is not None and ext in IMAGE_EXTENSIONS:
        return _read_image(data, image)
    return data


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress a ``.gz`` member, refusing more than ``limit`` bytes (decompression bombs)."""
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        out = stream.read(limit + 1)
    if len(out) > limit:
        raise ValidationError(f"member: expected at most {limit} decompressed bytes, got more")
    return out


# --------------------------------------------------------------------------- the decoding stage
class SkipCounter:
    """A webdataset ``handler=`` that skips what failed, counts it and keeps the messages.

    Pass it as ``handler=`` of ``wds.tarfile_to_samples`` / ``wds.map`` (it returns True:
    "continue"), to :class:`SafeDecoder` (refused pickle members) or to :func:`read_shards`.
    :meth:`report` warns once with the count; :meth:`report_at_end` is a pipeline stage
    that calls it when the stream ends. Counts are per process: each DataLoader worker
    holds its own copy.

    ``count`` counts every problem (a refused member, a skipped sample, a damaged shard);
    ``samples`` the samples :func:`~cmda_data.io.shards.read_shards` skipped or found
    missing (so samples emitted + ``samples`` == samples written, for shards with a
    manifest); ``damaged`` the shards without a manifest that ended in a damaged member
    (how many samples they lost is unknown).

    Args:
        name: what is counted, for the messages.
        max_errors: how many messages to keep (the count goes on).

    Examples:
        >>> counter = SkipCounter()
        >>> counter(ValueError("truncated .npy")), counter.count, counter.errors
        (True, 1, ['ValueError: truncated .npy'])
        >>> counter.summary()
        'webdataset: skipped 1 item(s); first: ValueError: truncated .npy'
        >>> counter.skip(ValueError("shard cut short"), samples=3), counter.count, counter.samples
        (True, 2, 3)
        >>> counter.summary()
        'webdataset: skipped 2 item(s), 3 sample(s) lost or skipped; first: ValueError: truncated .npy'
    """

    def __init__(self, name: str = "webdataset", *, max_errors: int = 20) -> None:
        self.name = str(name)
        self.max_errors = check_int("max_errors", max_errors, minimum=0)
        self.count = 0
        self.samples = 0
        self.damaged = 0
        self.errors: List[str] = []
        self._reported = 0

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        if len(self.errors) < self.max_errors:
            text = f"{type(exn).__name__}: {exn}"
            self.errors.append(text if len(text) <= 400 else text[:397] + "...")
        return True

    def skip(self, exn: BaseException, *, samples: int = 1, unknown: bool = False) -> bool:
        """Count one problem that cost ``samples`` samples (``unknown``: and an unknown number more)."""
        self(exn)
        self.samples += int(samples)
        self.damaged += bool(unknown)
        return True

    def summary(self) -> str:
        """One line: how many items (and samples) were skipped and the first message."""
        if not self.count:
            return f"{self.name}: skipped nothing"
        lost = f", {self.samples} sample(s) lost or skipped" if self.samples else ""
        if self.damaged:
            lost += f", {self.damaged} damaged shard(s) without a manifest (samples lost: unknown)"
        return f"{self.name}: skipped {self.count} item(s){lost}; first: {self.errors[0] if self.errors else '?'}"

    def report(self) -> None:
        """Warn (:class:`SkippedSamplesWarning`) once per new count; silent when nothing was skipped."""
        if self.count > self._reported:
            self._reported = self.count
            warnings.warn(self.summary(), SkippedSamplesWarning, stacklevel=2)

    def report_at_end(self, source: Iterable[Any]) -> Iterator[Any]:
        """A pipeline stage: passes samples through, then :meth:`report` at the end of the stream."""
        yield from source
        self.report()

    def reset(self) -> None:
        """Forget the count and the messages."""
        self.count, self.samples, self.damaged, self.errors, self._reported = 0, 0, 0, [], 0

    def __repr__(self) -> str:
        return f"SkipCounter(name={self.name!r}, count={self.count}, samples={self.samples})"


class SafeDecoder:
    """Decode a raw webdataset sample (``{"__key__": ..., "image.npy": b"..."}``) without pickle.

    ``.npy`` members become tensors (read with ``allow_pickle=False``), ``.cls`` ints,
    ``.txt`` strings, ``.json`` JSON values, images (with ``image=``) tensors; ``.gz``
    members are decompressed first; other extensions stay bytes. Members of pickle-based
    formats (``.pyd``, ``.pickle``, ``.pkl``, ``.pth``, ``.pt``, ...) are never decoded:
    with ``unsafe="skip"`` (default) they are dropped from the sample and counted
    (``refused`` and the ``counter``; a warning when no counter is given), with
    ``unsafe="error"`` they raise :class:`~cmda_data.ValidationError`, so the sample is
    dropped by a ``handler``.

    A corrupt member raises :class:`~cmda_data.ValidationError` naming the member and the
    sample key; use the decoder through ``wds.map(decoder, handler=SkipCounter())`` to skip
    and count such samples. Meta keys (``__key__``, ``__url__``) pass through.

    Args:
        image: decode image members: ``"torchrgb"`` (float ``[3, H, W]`` in [0, 1]),
            ``"torchrgb8"``, ``"torchl"``, ``"torchl8"`` or ``"pil"``; None keeps bytes.
        strip: name fields without the extension (``"image.npy"`` -> ``"image"``).
        unsafe: ``"skip"`` or ``"error"``.
        counter: a :class:`SkipCounter` that counts refused members.
        handlers: extension -> ``bytes -> value`` for more formats (pickle ones refused).
        required: fields every sample must have, else it raises (and a ``handler`` skips
            it): a sequence of names (without extension), or None (no check). Never
            inferred from a sample; extra members are kept and not checked.
            :func:`~cmda_data.io.shards.read_shards` checks the fields of each shard's
            manifest by itself.

    Examples:
        >>> import warnings
        >>> decoder = SafeDecoder(counter=SkipCounter())
        >>> out = decoder({"__key__": "k", "x.pyd": b"...", "y.cls": b"1"})
        >>> sorted(out), decoder.refused, decoder.counter.count
        (['__key__', 'y'], 1, 1)
    """

    def __init__(self, *, image: Optional[str] = None, strip: bool = True, unsafe: str = "skip",
                 counter: Optional[SkipCounter] = None,
                 handlers: Optional[Mapping[str, Callable[[bytes], Any]]] = None,
                 required: Union[str, Sequence[str], None] = None) -> None:
        if image is not None:
            check_option("image", image, tuple(IMAGE_SPECS))
        if not isinstance(strip, bool):
            fail("strip", "True or False", strip)
        self.image, self.strip = image, strip
        self.unsafe = check_option("unsafe", unsafe, ("skip", "error"))
        if counter is not None and not callable(counter):
            fail("counter", "a SkipCounter (or a callable exception -> bool)", counter)
        self.counter = counter
        self.handlers = dict(handlers or {})
        for ext in self.handlers:
            if ext in UNSAFE_EXTENSIONS:
                fail("handlers", "no decoder for pickle-based extensions", f".{ext}", raw=True)
        if required is not None and (isinstance(required, (str, bytes)) or not isinstance(required, Iterable)):
            fail("required", "None or a sequence of field names (fields are never inferred from a sample)",
                 required)
        self.required = None if required is None else tuple(required)
        if self.required is not None and not all(isinstance(name, str) and name for name in self.required):
            fail("required", "a sequence of field names (non-empty str)", list(self.required))
        self.refused = 0
        self._warned = False

    def _refuse(self, member: str, key: Any) -> None:
        message = (f"member {member!r} of sample {key!r}: expected a non-pickle format (npy, json, "
                   f"txt, cls, images), got .{split_member(member)[1]} (never unpickled)")
        if self.unsafe == "error":
            raise ValidationError(message)
        self.refused += 1
        if self.counter is not None:
            self.counter(ValidationError(message + "; member dropped"))
        elif not self._warned:
            self._warned = True
            warnings.warn(message + "; member dropped (pass counter=SkipCounter() to count them)",
                          SkippedSamplesWarning, stacklevel=3)

    def decode_one(self, member: str, data: Any, key: Any = None) -> Any:
        """Decode one member (``"image.npy"``) of the sample ``key``."""
        field, ext = split_member(member)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return data  # already decoded
        data = bytes(data)
        try:
            if ext == "gz":
                data = gunzip(data, _GZ_LIMIT)
                field, ext = split_member(field)
            if ext in self.handlers:
                return self.handlers[ext](data)
            return decode_member(ext, data, image=self.image)
        except MissingDependencyError:
            raise
        except Exception as error:  # corrupt data: one error type, naming the member
            raise ValidationError(f"member {member!r} of sample {key!r}: expected a valid .{ext} member, "
                                  f"got {type(error).__name__}: {error}") from error

    def __call__(self, sample: Mapping[str, Any]) -> Dict[str, Any]:
        if not isinstance(sample, Mapping):
            fail("sample", "a dict of webdataset members", sample)
        key = sample.get("__key__")
        out: Dict[str, Any] = {}
        fields = set()  # field names without extension, for the required check
        for member, data in sample.items():
            if not isinstance(member, str):
                fail(f"member {member!r} of sample {key!r}", "a member name (a str such as 'image.npy')",
                     member)
            if member.startswith("__"):
                out[member] = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
                continue
            field, ext = split_member(member)
            if ext in UNSAFE_EXTENSIONS or (ext == "gz" and split_member(field)[1] in UNSAFE_EXTENSIONS):
                self._refuse(member, key)
                continue
            value = self.decode_one(member, data, key)
            name = split_member(field)[0] if ext == "gz" else field
            fields.add(name)
            name = name if self.strip else member
            if name in out:
                fail(f"member {member!r} of sample {key!r}", "one member per field (strip=False keeps "
                     "the extensions)", f"a second member for field {name!r}", raw=True)
            out[name] = value
        if self.required is not None:
            self._check_required(fields, key)
        return out

    def _check_required(self, fields: set, key: Any) -> None:
        need = frozenset(self.required)
        missing = sorted(need - fields)
        if missing:
            fail(f"sample {key!r}", "the fields " + ", ".join(sorted(need)),
                 "a sample without " + ", ".join(missing) + " (a truncated shard?)", raw=True)

    def __repr__(self) -> str:
        return f"SafeDecoder(image={self.image!r}, strip={self.strip}, unsafe={self.unsafe!r})"
