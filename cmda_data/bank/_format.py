"""The on-disk format of an EmbeddingBank: write, read, verify (private).

A bank is a folder of two files; nothing in it is pickled and nothing read is executed:

* ``bank.safetensors``: every tensor (embeddings, responsibilities, indices, PCA, GMM);
* ``bank.json``: roles, sizes, the GMM's settings, ``metadata``, and two integrity records:
  ``files`` (size and SHA-256 of ``bank.safetensors``) and ``checksum`` (SHA-256 of the rest of
  ``bank.json`` in canonical form, so any edit of a value is seen while re-indenting is not).

:func:`read_bank` checks, in this order, and raises :class:`~cmda_data.BankFormatError` naming
the file at fault: the JSON schema of ``bank.json`` (types, required keys, no unknown key), its
checksum, the size and SHA-256 of ``bank.safetensors`` (streamed in 1 MiB chunks, so memory
stays flat), the strict safetensors header, then every tensor against ``bank.json`` (names,
dtypes, shapes) and the GMM (:func:`~cmda_data.bank._checks.check_gmm_state`). Banks saved
before the integrity records existed load with a :class:`~cmda_data.CMDAWarning`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ..core._validation import describe, fail
from ..exceptions import BankFormatError, CMDAError, CMDAWarning, ValidationError
from ..io._safetensors import (
    RawFile,
    check_mmap,
    file_sha256,
    load_file,
    read_header,
    save_file,
)
from ._checks import check_gmm_state, count_non_finite
from ._fit import gmm_state

__all__ = ["CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "TENSORS_NAME", "bank_config", "read_bank", "write_bank"]

TENSORS_NAME = "bank.safetensors"
CONFIG_NAME = "bank.json"
FORMAT = "cmda_data.EmbeddingBank"
FORMAT_VERSION = 1
#: keys of bank.json: required ones, then the integrity records (absent in banks saved before them)
REQUIRED_KEYS = ("dim", "format", "format_version", "gmm", "metadata", "modalities", "rows", "student", "teachers")
INTEGRITY_KEYS = ("checksum", "files")
_MAX_CONFIG_BYTES = 64 * 1024 * 1024
#: bytes per block when the values of a memory-mapped bank are checked from its file
_CHECK_BLOCK_BYTES = 1 << 24


def _canonical_sha256(config: Mapping[str, Any]) -> str:
    """SHA-256 of ``config`` without its ``checksum``, as sorted compact JSON."""
    body = {key: value for key, value in config.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def bank_config(*, student: str, teachers: List[str], modalities: List[str], rows: int, dim: int,
                gmm: Optional[Dict[str, Any]], metadata: Dict[str, Any]) -> Dict[str, Any]:
    """The content of ``bank.json`` before its integrity records."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "student": student, "teachers": list(teachers),
            "modalities": list(modalities), "rows": rows, "dim": dim, "gmm": gmm, "metadata": metadata}


def bank_contents(*, embeddings: Mapping[str, Any], responsibilities: Any, indices: Any, pca: Any, gmm: Any,
                  student: str, teachers: List[str], metadata: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(config, tensors)`` to :func:`write_bank` for a bank's parts, each named as ``bank.safetensors`` has it.

    The tensors may be in memory (written from CPU copies) or
    :class:`~cmda_data.io._safetensors.RawFile` s (the disk-backed build); ``None`` parts are left out.
    """
    tensors: Dict[str, Any] = {f"embeddings.{m}": t for m, t in embeddings.items()}
    named = {"responsibilities": responsibilities, "indices": indices,
             "pca.mean": None if pca is None else pca[0], "pca.components": None if pca is None else pca[1]}
    tensors.update({name: t for name, t in named.items() if t is not None})
    gmm_config, gmm_tensors = gmm_state(gmm)
    tensors.update({f"gmm.{k}": v for k, v in gmm_tensors.items()})
    tensors = {k: v if isinstance(v, RawFile) else v.detach().cpu().contiguous() for k, v in tensors.items()}
    rows, dim = next(iter(tensors.values())).shape
    config = bank_config(student=student, teachers=list(teachers), modalities=list(embeddings), rows=int(rows),
                         dim=int(dim), gmm=gmm_config, metadata=metadata)
    return config, tensors


def write_bank(folder: Path, config: Dict[str, Any], tensors: Mapping[str, Union[torch.Tensor, RawFile]], *,
               progress: bool = False) -> None:
    """Write ``bank.safetensors`` then ``bank.json`` (with its integrity records) into ``folder``.

    A tensor may be a :class:`~cmda_data.io._safetensors.RawFile` (copied from its file in blocks).

    Each file is written under a temporary name and renamed when complete; ``bank.json`` goes
    last, so a save cut short leaves a hash that no longer matches (never a half-read bank).
    """
    try:
        json.dumps(config)
    except (TypeError, ValueError) as error:
        fail("bank.metadata", "JSON-serialisable values", str(error), raw=True)
    digest = save_file(tensors, folder / TENSORS_NAME, metadata={"format": "pt"}, progress=progress)
    config = dict(config, files={TENSORS_NAME: {"bytes": (folder / TENSORS_NAME).stat().st_size, "sha256": digest}})
    config["checksum"] = _canonical_sha256(config)
    partial = folder / (CONFIG_NAME + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, folder / CONFIG_NAME)


def _bad(where: Union[str, Path], expected: str, got: Any, *, raw: bool = False) -> None:
    fail(str(where), expected, got, BankFormatError, raw=raw)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_names(value: Any) -> bool:
    return (isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
            and len(set(value)) == len(value))


def check_config(config: Any, path: Path) -> Dict[str, Any]:
    """The schema of ``bank.json``: every key with its type, nothing unknown, nothing missing."""
    if not isinstance(config, dict):
        _bad(path, "a JSON object", config)
    missing = [key for key in REQUIRED_KEYS if key not in config]
    unknown = sorted(set(config) - set(REQUIRED_KEYS) - set(INTEGRITY_KEYS))
    if missing or unknown:
        _bad(path, "the keys " + ", ".join(REQUIRED_KEYS) + " (and " + ", ".join(INTEGRITY_KEYS) + ")",
             "; ".join(filter(None, ["missing " + ", ".join(missing) if missing else "",
                                     "unknown " + ", ".join(map(repr, unknown)) if unknown else ""])), raw=True)
    if config["format"] != FORMAT or config["format_version"] != FORMAT_VERSION:
        _bad(path, f"format {FORMAT!r} version {FORMAT_VERSION}",
             f"{config['format']!r} version {config['format_version']!r}", raw=True)
    checks = {
        "student": (isinstance(config["student"], str), "a modality name (string)"),
        "teachers": (_is_names(config["teachers"]), "a non-empty list of distinct modality names"),
        "modalities": (_is_names(config["modalities"]), "a non-empty list of distinct modality names"),
        "rows": (_is_int(config["rows"], 1), "an integer >= 1"),
        "dim": (_is_int(config["dim"], 1), "an integer >= 1"),
        "gmm": (config["gmm"] is None or isinstance(config["gmm"], dict), "null or a JSON object"),
        "metadata": (isinstance(config["metadata"], dict), "a JSON object"),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            _bad(f"{path}: {key}", expected, config[key])
    roles = [config["student"]] + config["teachers"]
    if not set(roles) <= set(config["modalities"]) or config["student"] in config["teachers"]:
        _bad(f"{path}: student, teachers", f"distinct modalities among {config['modalities']}", roles)
    if "checksum" in config and not _is_hex(config["checksum"]):
        _bad(f"{path}: checksum", "a SHA-256 hex digest (64 hex characters)", config["checksum"])
    if "files" in config:
        record = config["files"].get(TENSORS_NAME) if isinstance(config["files"], dict) else None
        if (not isinstance(record, dict) or set(config["files"]) != {TENSORS_NAME} or set(record) != {"bytes", "sha256"}
                or not _is_int(record["bytes"], 8) or not _is_hex(record["sha256"])):
            _bad(f"{path}: files", f'{{"{TENSORS_NAME}": {{"bytes": integer, "sha256": 64 hex characters}}}}',
                 config["files"])
    return config


def _is_hex(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _read_config(path: Path) -> Dict[str, Any]:
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        _bad(path, f"a bank.json of at most {_MAX_CONFIG_BYTES} bytes", f"{path.stat().st_size} bytes", raw=True)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        _bad(path, "valid JSON", f"{type(error).__name__}: {error}", raw=True)


def _verify(folder: Path, config: Dict[str, Any], verify: bool) -> None:
    """The integrity records: checksum of bank.json, size and SHA-256 of bank.safetensors."""
    config_file, tensor_file = folder / CONFIG_NAME, folder / TENSORS_NAME
    if "files" not in config or "checksum" not in config:
        warnings.warn(f"{config_file}: this bank was saved without SHA-256 records (before cmda_data recorded "
                      "them), so damage to its files cannot be detected; load it and save it again to add them",
                      CMDAWarning, stacklevel=4)
        return
    if verify and _canonical_sha256(config) != config["checksum"]:
        _bad(config_file, f"the checksum {config['checksum'][:12]}... recorded in it (edited after saving? "
             "save the bank again, or load with verify=False)", "different content", raw=True)
    record = config["files"][TENSORS_NAME]
    size = tensor_file.stat().st_size
    if size != record["bytes"]:
        _bad(tensor_file, f"{record['bytes']} bytes (recorded in {CONFIG_NAME})", f"{size} bytes", raw=True)
    if verify:
        digest = file_sha256(tensor_file)
        if digest != record["sha256"]:
            _bad(tensor_file, f"SHA-256 {record['sha256']} (recorded in {CONFIG_NAME}): the file is damaged "
                 "or was replaced", digest, raw=True)


def _expected_tensors(config: Dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Dict[str, Tuple]:
    """name -> (allowed dtypes, shape or None) of every tensor a bank may hold."""
    rows, dim = config["rows"], config["dim"]
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    out: Dict[str, Tuple] = {f"embeddings.{m}": ((torch.float32,), (rows, dim)) for m in config["modalities"]}
    out["responsibilities"] = ((torch.float32,), None)
    out["indices"] = ((torch.int64,), (rows,))
    out["pca.mean"] = ((torch.float32,), (dim,))
    out["pca.components"] = ((torch.float32,), None)
    for name in tensors:
        if name.startswith("gmm."):
            out.setdefault(name, (floats, None))  # names and shapes checked by check_gmm_state
    return out


Blocks = Callable[[str, torch.Tensor], Iterator[torch.Tensor]]


def _in_memory(name: str, tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    yield tensor


def _file_blocks(path: Path) -> Blocks:
    """Row blocks of a float32 tensor of ``path`` read with ``np.fromfile`` (a few MiB each).

    The values of a memory-mapped bank are checked this way: reading through the mapping would
    map every page into the process (its RSS would grow by the whole file, and so would that of
    every DataLoader worker forked after loading); read from the file, nothing stays mapped.
    """
    header = read_header(path)
    start = int(header["__header_bytes__"])

    def blocks(name: str, tensor: torch.Tensor) -> Iterator[torch.Tensor]:
        if tensor.dtype != torch.float32 or tensor.ndim == 0 or tensor.numel() * 4 <= _CHECK_BLOCK_BYTES:
            yield tensor
            return
        begin = start + header[name]["data_offsets"][0]
        row = math.prod(tensor.shape[1:])
        step = max(1, _CHECK_BLOCK_BYTES // (4 * row))
        for first in range(0, tensor.shape[0], step):
            count = min(step, tensor.shape[0] - first)
            block = np.fromfile(path, dtype="<f4", count=count * row, offset=begin + first * row * 4)
            yield torch.from_numpy(block).reshape(count, *tensor.shape[1:])
    return blocks


def _check_tensors(path: Path, config: Dict[str, Any], tensors: Dict[str, torch.Tensor],
                   blocks: Blocks = _in_memory) -> None:
    expected = _expected_tensors(config, tensors)
    missing = [f"embeddings.{m}" for m in config["modalities"] if f"embeddings.{m}" not in tensors]
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        _bad(path, "the tensors of the modalities " + ", ".join(config["modalities"]) + " and known bank tensors",
             "; ".join(filter(None, ["missing " + ", ".join(missing) if missing else "",
                                     "unknown " + ", ".join(unknown) if unknown else ""])), raw=True)
    for name, tensor in tensors.items():
        dtypes, shape = expected[name]
        if tensor.dtype not in dtypes or (shape is not None and tuple(tensor.shape) != shape):
            want = "a float tensor" if len(dtypes) > 1 else str(dtypes[0]).replace("torch.", "")
            _bad(f"{path}: tensor {name!r}", want + (f" of shape {list(shape)}" if shape else ""), tensor)
        if any(count_non_finite(block) for block in blocks(name, tensor)):
            _bad(f"{path}: tensor {name!r}", "finite values", "NaN or infinity", raw=True)
    if ("pca.mean" in tensors) != ("pca.components" in tensors):
        _bad(path, "both pca.mean and pca.components, or neither", sorted(n for n in tensors if n.startswith("pca")))
    features = dim = config["dim"]
    if "pca.components" in tensors:
        components = tensors["pca.components"]
        if components.ndim != 2 or components.shape[1] != dim or not 1 <= components.shape[0] <= dim:
            _bad(f"{path}: tensor 'pca.components'", f"float32 [r, {dim}] with 1 <= r <= {dim}", components)
        features = components.shape[0]
    resp = tensors.get("responsibilities")
    if resp is not None:
        if resp.ndim != 2 or resp.shape[0] != config["rows"] or resp.shape[1] < 1:
            _bad(f"{path}: tensor 'responsibilities'", f"float32 [{config['rows']}, M]", resp)
        for block in blocks("responsibilities", resp):
            if (bool((block < 0).any()) or bool((block > 1).any())
                    or bool(((block.double().sum(1) - 1).abs() > 1e-4).any())):
                _bad(f"{path}: tensor 'responsibilities'", "rows of probabilities in [0, 1] that sum to 1",
                     describe(resp), raw=True)
    gmm_tensors = {name[4:]: t for name, t in tensors.items() if name.startswith("gmm.")}
    check_gmm_state(config["gmm"], gmm_tensors, features=features,
                    components=None if resp is None else resp.shape[1],
                    config_file=str(path.with_name(CONFIG_NAME)), tensor_file=str(path))


def read_bank(folder: Path, *, mmap: Union[bool, str], verify: bool) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a bank folder, every check of the module docstring passed.

    With ``mmap``, the values of the large tensors are checked from the file, not through the
    mapping, so loading maps no page into the process (see :func:`_file_blocks`).
    """
    config_file, tensor_file = folder / CONFIG_NAME, folder / TENSORS_NAME
    if not config_file.is_file() or not tensor_file.is_file():
        fail("path", f"a folder written by EmbeddingBank.save ({CONFIG_NAME} and {TENSORS_NAME})",
             str(folder), ValidationError, raw=True)
    if not isinstance(verify, bool):
        fail("verify", "True or False", verify)
    check_mmap(mmap)
    config = check_config(_read_config(config_file), config_file)
    _verify(folder, config, verify)
    try:
        tensors = load_file(tensor_file, mmap=mmap)
    except CMDAError as error:  # the strict header: the message names the file already
        raise BankFormatError(str(error)) from None
    _check_tensors(tensor_file, config, tensors, _in_memory if mmap is False else _file_blocks(tensor_file))
    return config, tensors
