"""Shard files without webdataset (private): URL checks, manifests, tar members grouped into samples.

:mod:`cmda_data.io.shards` builds on them. Nothing here opens a URL: :func:`local_path`
says whether a shard is a local file, and everything else reads local files or a stream it
is given.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from typing import IO, Any, Dict, Iterable, Iterator, Optional

from ..core._validation import fail
from .codec import split_member

__all__ = ["MANIFEST_SUFFIX", "field_of", "local_path", "raw_samples", "read_manifest", "write_manifest"]

#: the manifest of shard ``p`` is the JSON file ``p + MANIFEST_SUFFIX``
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "cmda_data.shard-manifest"
_MANIFEST_LIMIT = 1 << 20  # bytes: a manifest is a few hundred
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's <key>.<suffix> split
_URL_EXPECTED = ("a local path or a file: URL (allow_pipe=True lets webdataset open other URLs, "
                 "which starts a process: a shell for pipe:, curl for http: ...)")


def local_path(url: Any, what: str, allow_pipe: bool) -> Optional[str]:
    """The local path of ``url``; None for a URL that webdataset opens (only with ``allow_pipe``).

    A path without a scheme (or with a one-letter Windows drive) is local; ``file:`` URLs are
    stripped (no percent-decoding); any other scheme (``pipe:``, ``http:``, ``s3:`` ...) is
    refused unless ``allow_pipe``.

    Examples:
        >>> local_path("shards/a-000.tar", "urls", False), local_path("file:///d/a.tar", "urls", False)
        ('shards/a-000.tar', '/d/a.tar')
        >>> local_path("pipe:curl -s http://host/a.tar", "urls", False)
        Traceback (most recent call last):
        ...
        cmda_data.exceptions.ValidationError: urls: expected a local path or a file: URL ..., got 'pipe:curl -s http://host/a.tar'
    """
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        fail(what, "a shard path or URL (a non-empty str)", url)
    match = _SCHEME.match(url)
    if match is None or len(match.group(1)) == 1:
        return url
    if match.group(1).lower() == "file":
        rest = url[len(match.group(0)):]
        if rest.startswith("//"):  # file://host/path -> /path
            rest = rest[2:]
            rest = rest[rest.find("/"):] if "/" in rest else ""
        if not rest:
            fail(what, "a file: URL with a path", repr(url), raw=True)
        return rest
    if allow_pipe:
        return None
    fail(what, _URL_EXPECTED, repr(url), raw=True)


# --------------------------------------------------------------------------- manifests
def write_manifest(path: str, samples: int, fields: Iterable[str]) -> None:
    data = {"format": MANIFEST_FORMAT, "version": 1, "shard": os.path.basename(path),
            "samples": int(samples), "fields": sorted(fields), "bytes": os.path.getsize(path)}
    target = path + MANIFEST_SUFFIX
    with open(target + ".tmp", "w", encoding="utf-8") as stream:
        json.dump(data, stream, indent=1)
    os.replace(target + ".tmp", target)


def read_manifest(shard: str) -> Optional[Dict[str, Any]]:
    """The manifest :func:`write_shards` wrote beside the local ``shard`` (None when it has none).

    ``{"format": "cmda_data.shard-manifest", "version": 1, "shard": <file name>,
    "samples": <count>, "fields": [<field every sample has>, ...], "bytes": <shard size>}``.
    A manifest that is not valid JSON or lacks a key raises
    :class:`~cmda_data.ValidationError` naming the file.
    """
    path = os.fspath(shard) + MANIFEST_SUFFIX
    if not os.path.isfile(path):
        return None
    where = f"manifest {path!r}"
    try:
        with open(path, "rb") as stream:
            raw = stream.read(_MANIFEST_LIMIT + 1)
        if len(raw) > _MANIFEST_LIMIT:
            raise ValueError(f"more than {_MANIFEST_LIMIT} bytes")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as error:
        fail(where, "a JSON shard manifest written by write_shards", f"{type(error).__name__}: {error}", raw=True)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or data.get("version") != 1:
        fail(where, f"a dict with format {MANIFEST_FORMAT!r} and version 1", data)
    for key in ("samples", "bytes"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail(f"{where}, key {key!r}", "an integer >= 0", value)
    fields = data.get("fields")
    if not isinstance(fields, list) or not all(isinstance(f, str) and f for f in fields):
        fail(f"{where}, key 'fields'", "a list of field names", fields)
    return data


def field_of(suffix: str) -> str:
    """The field of a member suffix: ``"image.npy"`` -> ``"image"``, ``"x.npy.gz"`` -> ``"x"``."""
    field, ext = split_member(suffix)
    return split_member(field)[0] if ext == "gz" else field


def raw_samples(stream: IO[bytes], url: str) -> Iterator[Dict[str, Any]]:
    """Undecoded samples ``{"__key__", "__url__", <suffix>: bytes}`` of one tar stream.

    Members are grouped by key as webdataset does; ``__meta__`` members and members without
    a key are passed over; a second member with the same suffix marks the sample ``__bad__``.
    A sample cut short by a damaged stream is never yielded (the error propagates).
    """
    current: Optional[Dict[str, Any]] = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            tar.members = []
            name = info.name
            if "/" not in name and name.startswith("__") and name.endswith("__"):
                continue
            match = _KEY.match(name)
            if match is None:
                continue
            key, suffix = match.group(1), match.group(2).lower()
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current  # complete: the next key has begun
                current = {"__key__": key, "__url__": url}
            data = tar.extractfile(info).read()
            if suffix in current:
                current["__bad__"] = f"two members with the suffix {suffix!r}"
            else:
                current[suffix] = data
    if current is not None:
        yield current
