"""Fuzzed bank files: a damaged bank is refused with a BankFormatError naming the file, or loads equal.

One bank (two modalities, PCA, a full-covariance GMM) is saved once; every example writes a
copy into a fresh folder and damages it: a bit flipped anywhere in either file, a file cut
short, or one field of one safetensors header entry set to a random JSON value. The
property (issue 14): ``EmbeddingBank.load`` either returns a bank equal to the original in
every tensor, setting and metadata (a flip that does not matter, such as whitespace of
``bank.json``), or raises :class:`~cmda_data.BankFormatError` whose message names the damaged
file. Any other exception fails. With SHA-256 verification (the default) no damage to
``bank.safetensors`` can load; without it (``verify=False``), flips in the header and header
edits must still be caught by the structural checks.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Dict, Tuple

import strategies as S
from _entry_data import make_bank
from hypothesis import given
from hypothesis import strategies as st

from cmda_data.bank import EmbeddingBank
from cmda_data.bank._fit import gmm_state
from cmda_data.exceptions import BankFormatError

FILES = ("bank.json", "bank.safetensors")


@lru_cache(maxsize=1)
def _original() -> Tuple[Dict[str, bytes], Dict[str, object]]:
    """The saved files' bytes and a snapshot of the bank they hold."""
    folder = Path(tempfile.mkdtemp(prefix="cmda_fuzz_bank_"))
    try:
        make_bank(24, reduce_dim=4).save(folder)
        files = {name: (folder / name).read_bytes() for name in FILES}
        return files, _snapshot(EmbeddingBank.load(folder))
    finally:
        shutil.rmtree(folder)


def _snapshot(bank: EmbeddingBank) -> Dict[str, object]:
    config, gmm_tensors = gmm_state(bank.gmm)
    tensors = dict(bank._tensors(), **{f"gmm.{k}": v for k, v in gmm_tensors.items()})
    return {"roles": (bank.modalities, bank.student, bank.teachers), "gmm": json.dumps(config, sort_keys=True),
            "metadata": json.dumps(bank.metadata, sort_keys=True),
            "tensors": {k: (v.dtype, tuple(v.shape), v.numpy().tobytes()) for k, v in tensors.items()}}


def _load_damaged(files: Dict[str, bytes], damaged: str, verify: bool = True) -> str:
    """Write ``files``, load them; 'refused' (BankFormatError naming ``damaged``) or 'equal'."""
    with tempfile.TemporaryDirectory(prefix="cmda_fuzz_bank_") as name:
        folder = Path(name)
        for file, data in files.items():
            (folder / file).write_bytes(data)
        try:
            loaded = EmbeddingBank.load(folder, verify=verify)
        except BankFormatError as error:
            assert damaged in str(error), f"{error} does not name {damaged}"
            return "refused"
        assert _snapshot(loaded) == _original()[1], f"damage to {damaged} loaded a different bank"
        del loaded  # the mapping must go before the folder
        return "equal"


def _flip(data: bytes, position: int, bit: int) -> bytes:
    out = bytearray(data)
    out[position % len(out)] ^= 1 << bit
    return bytes(out)


@given(st.sampled_from(FILES), st.data())
def test_a_bit_flip_anywhere_is_refused_or_harmless(file, data):
    files = dict(_original()[0])
    position, bit = data.draw(S.bit_flips(len(files[file])))
    files[file] = _flip(files[file], position, bit)
    outcome = _load_damaged(files, file)
    if file == "bank.safetensors":
        assert outcome == "refused"  # SHA-256: no flip in the tensor file goes unnoticed


@given(st.data())
def test_a_bit_flip_in_the_header_is_refused_without_verify(data):
    files = dict(_original()[0])
    raw = files["bank.safetensors"]
    (length,) = struct.unpack("<Q", raw[:8])
    position = data.draw(st.integers(0, 8 + length - 1))
    files["bank.safetensors"] = _flip(raw, position, data.draw(st.integers(0, 7)))
    _load_damaged(files, "bank.safetensors", verify=False)


@given(st.sampled_from(FILES), st.data())
def test_a_truncated_file_is_refused(file, data):
    files = dict(_original()[0])
    files[file] = files[file][:data.draw(st.integers(0, len(files[file]) - 1))]
    outcome = _load_damaged(files, file)
    if file == "bank.safetensors":
        assert outcome == "refused"


@given(st.data(), st.booleans())
def test_a_header_edit_is_refused_or_harmless(data, verify):
    files = dict(_original()[0])
    raw = files["bank.safetensors"]
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    name, field, value = data.draw(S.header_edits([k for k in header if k != "__metadata__"]))
    header[name][field] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    files["bank.safetensors"] = struct.pack("<Q", len(text)) + text + raw[8 + length:]
    outcome = _load_damaged(files, "bank.safetensors", verify=verify)
    if verify or field == "extra":
        assert outcome == "refused"


def test_the_original_loads_equal():
    """The control: undamaged files load equal (so 'equal' above means a harmless change)."""
    assert _load_damaged(dict(_original()[0]), "nothing") == "equal"
