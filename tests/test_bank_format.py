"""EmbeddingBank files (issue 14): SHA-256 records, strict checks, tampering, memory-mapped loading.

Every damage case here loaded silently (or raised KeyError/TypeError) before the integrity
records and the checks of ``cmda_data/bank/_format.py``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _entry_data import make_bank
from torch.utils.data import DataLoader, Dataset, get_worker_info

from cmda_data import BankFormatError, CMDAError, CMDAWarning, EmbeddingBank
from cmda_data.exceptions import ValidationError
from cmda_data.io._safetensors import load_file, save_file


# -- helpers ------------------------------------------------------------------------------------
def _equal(a: EmbeddingBank, b: EmbeddingBank) -> None:
    assert (a.modalities, a.student, a.teachers) == (b.modalities, b.student, b.teachers)
    for m in a.modalities:
        assert torch.equal(a.embeddings[m], b.embeddings[m])
    assert torch.equal(a.responsibilities, b.responsibilities)
    assert json.loads(json.dumps(a.metadata)) == b.metadata


def _reseal(folder: Path) -> None:
    """Rewrite bank.json's integrity records for the files as they are now (a hostile or buggy writer)."""
    config = json.loads((folder / "bank.json").read_text())
    raw = (folder / "bank.safetensors").read_bytes()
    config["files"] = {"bank.safetensors": {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}}
    config.pop("checksum", None)
    body = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config["checksum"] = hashlib.sha256(body).hexdigest()
    (folder / "bank.json").write_text(json.dumps(config))


def _edit_json(folder: Path, edit, reseal: bool = True) -> None:
    config = json.loads((folder / "bank.json").read_text())
    edit(config)
    (folder / "bank.json").write_text(json.dumps(config))
    if reseal:
        _reseal(folder)


def _edit_tensors(folder: Path, edit) -> None:
    tensors = {k: v.clone() for k, v in load_file(folder / "bank.safetensors", mmap=False).items()}
    edit(tensors)
    save_file(tensors, folder / "bank.safetensors")
    _reseal(folder)


def _edit_header(folder: Path, edit) -> None:
    path = folder / "bank.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    _reseal(folder)


@pytest.fixture
def saved(tmp_path):
    bank = make_bank(30, reduce_dim=4)
    return bank, bank.save(tmp_path / "bank")


# -- 1. SHA-256 of the tensor file --------------------------------------------------------------------
def test_bank_json_records_the_sha256_of_the_tensor_file(saved):
    _, folder = saved
    config = json.loads((folder / "bank.json").read_text())
    raw = (folder / "bank.safetensors").read_bytes()
    assert config["files"] == {"bank.safetensors": {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}}
    assert len(config["checksum"]) == 64
    assert sorted(p.name for p in folder.iterdir()) == ["bank.json", "bank.safetensors"]  # no partial files


@pytest.mark.parametrize("where", ["embeddings", "responsibilities", "gmm.means_", "last byte"])
def test_one_bit_flip_in_the_tensor_data_is_refused(saved, where):
    bank, folder = saved
    path = folder / "bank.safetensors"
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    key = {"embeddings": "embeddings.image"}.get(where, where)
    position = len(raw) - 1 if where == "last byte" else 8 + length + header[key]["data_offsets"][0] + 2
    raw[position] ^= 0x01  # the lowest mantissa bit: a value that is still finite and plausible
    path.write_bytes(bytes(raw))
    with pytest.raises(BankFormatError, match=r"bank\.safetensors: expected SHA-256 [0-9a-f]{64} \(recorded in "
                                              r"bank\.json\): the file is damaged"):
        EmbeddingBank.load(folder)
    loaded = EmbeddingBank.load(folder, verify=False)  # the opt-out: structure checked, bytes not hashed
    assert loaded.embeddings["image"].shape == bank.embeddings["image"].shape


def test_a_changed_size_is_refused_even_without_verify(saved):
    _, folder = saved
    path = folder / "bank.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(BankFormatError, match=r"bank\.safetensors: expected \d+ bytes \(recorded in bank\.json\)"):
        EmbeddingBank.load(folder, verify=False)


def test_bank_json_edited_after_saving_is_refused(saved):
    _, folder = saved
    _edit_json(folder, lambda c: c["metadata"].update(fit_on="image"), reseal=False)
    with pytest.raises(BankFormatError, match=r"bank\.json: expected the checksum .* \(edited after saving"):
        EmbeddingBank.load(folder)
    assert EmbeddingBank.load(folder, verify=False).metadata["fit_on"] == "image"


def test_bank_saved_before_the_hashes_still_loads_with_a_warning(saved):
    bank, folder = saved
    _edit_json(folder, lambda c: (c.pop("files"), c.pop("checksum")), reseal=False)
    with pytest.warns(CMDAWarning, match="saved without SHA-256 records .* save it again"):
        loaded = EmbeddingBank.load(folder)
    _equal(bank, loaded)
    loaded.save(folder)  # saving it again (over its own mapped file) adds the records
    with warnings.catch_warnings():
        warnings.simplefilter("error", CMDAWarning)
        _equal(bank, EmbeddingBank.load(folder))


def test_saving_over_the_folder_a_bank_was_mapped_from(saved):
    """The file is replaced, not rewritten in place: the mapped bank keeps its values (no SIGBUS)."""
    bank, folder = saved
    loaded = EmbeddingBank.load(folder)
    make_bank(12).save(folder)
    _equal(bank, loaded)
    assert len(EmbeddingBank.load(folder)) == 12


# -- 2./3. structure: the header, the tensors, the GMM (hashes resealed, so these checks must fire) ----
@pytest.mark.parametrize("edit, message", [
    (lambda h: h["responsibilities"].update(shape=[24.5, 2]), "a shape given as a list of non-negative integers"),
    (lambda h: h["responsibilities"]["data_offsets"].__setitem__(0, h["responsibilities"]["data_offsets"][0] - 8),
     "data_offsets|bytes"),
    (lambda h: h["embeddings.text"].update(data_offsets=h["embeddings.image"]["data_offsets"]),
     "contiguous, no overlap"),
    (lambda h: h["gmm.weights_"].update(dtype="I64"), "tensor 'gmm.weights_': expected a float tensor"),
    (lambda h: h["embeddings.image"].update(shape=[8, 30]), r"tensor 'embeddings.image': expected float32 of shape \[30, 8\]"),
    (lambda h: h.update(junk=h.pop("pca.mean")), "unknown junk"),
])
def test_header_damage_is_refused(saved, edit, message):
    _, folder = saved
    _edit_header(folder, edit)
    with pytest.raises(BankFormatError, match=message) as caught:
        EmbeddingBank.load(folder)
    assert "bank.safetensors" in str(caught.value)


def _nan(key):
    def edit(t):
        t[key].view(-1)[0] = float("nan")
    return edit


@pytest.mark.parametrize("edit, message", [
    (_nan("gmm.means_"), r"tensor 'gmm.means_': expected finite values"),
    (_nan("gmm.precisions_cholesky_"), r"tensor 'gmm.precisions_cholesky_': expected finite values"),
    (_nan("responsibilities"), r"tensor 'responsibilities': expected finite values"),
    (_nan("embeddings.text"), r"tensor 'embeddings.text': expected finite values"),
    (lambda t: t["gmm.precisions_cholesky_"][0].diagonal().neg_(), "upper-triangular factors with a positive diag"),
    (lambda t: t["gmm.precisions_cholesky_"][0].__setitem__((1, 0), 0.5), "upper-triangular"),
    (lambda t: t["gmm.precisions_"].mul_(2), r"gmm.precisions_': expected P @ P.T"),
    (lambda t: t["gmm.weights_"].mul_(2), "non-negative weights that sum to 1"),
    (lambda t: t["gmm.covariances_"][0].diagonal().neg_(), "symmetric positive-definite covariances"),
    (lambda t: t.update({"gmm.means_": t["gmm.means_"][:1]}), r"gmm.means_': expected a float tensor of shape \[2, 4\]"),
    (lambda t: t.pop("gmm.weights_"), "missing weights_"),
    (lambda t: t.update(responsibilities=t["responsibilities"] * 2), "rows of probabilities in \\[0, 1\\]"),
    (lambda t: t.update(indices=torch.arange(30).flip(0)), "sorted unique dataset indices"),
    (lambda t: t.update({"pca.components": t["pca.components"][:3]}), "n_features_in_: expected 3"),
])
def test_tensor_damage_is_refused(saved, edit, message):
    _, folder = saved
    _edit_tensors(folder, edit)
    with pytest.raises(BankFormatError, match=message):
        EmbeddingBank.load(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["gmm"].update(n_components=3), r"gmm.n_components: expected 2, the M of the responsibilities"),
    (lambda c: c["gmm"].update(covariance_type="diag"), r"gmm.weights_|gmm.covariances_': expected a float tensor "
                                                         r"of shape \[2, 4\]"),
    (lambda c: c.update(dim=9), r"tensor 'embeddings.image': expected float32 of shape \[30, 9\]"),
    (lambda c: c.update(rows=31), r"expected float32 of shape \[31, 8\]"),
    (lambda c: c.update(gmm=None), "gmm: expected the settings of the GMM behind the responsibilities"),
    (lambda c: c["gmm"]["fitted"].update(n_features_in_=8), "n_features_in_: expected 4"),
])
def test_gmm_settings_must_agree_with_the_tensors(saved, edit, message):
    _, folder = saved
    _edit_json(folder, edit)
    with pytest.raises(BankFormatError, match=message):
        EmbeddingBank.load(folder)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_every_covariance_type_round_trips(tmp_path, covariance_type):
    bank = make_bank(40, covariance_type=covariance_type)
    loaded = EmbeddingBank.load(bank.save(tmp_path / covariance_type))
    _equal(bank, loaded)
    z = bank.embeddings["text"]
    assert torch.equal(bank.responsibilities_for(z), loaded.responsibilities_for(z))


# -- 4. a tampered bank.json: always BankFormatError, never KeyError / TypeError --------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("modalities"), "missing modalities"),
    (lambda c: c.pop("gmm"), "missing gmm"),
    (lambda c: c.pop("metadata"), "missing metadata"),
    (lambda c: c.update(junk=[1, 2]), "unknown 'junk'"),
    (lambda c: c.update(rows="30"), r"rows: expected an integer >= 1, got '30'"),
    (lambda c: c.update(rows=True), "rows: expected an integer"),
    (lambda c: c.update(dim=8.0), "dim: expected an integer"),
    (lambda c: c.update(teachers="text"), "teachers: expected a non-empty list"),
    (lambda c: c.update(modalities=None), "modalities: expected a non-empty list"),
    (lambda c: c.update(modalities=["image", "image", "text"]), "modalities: expected a non-empty list of distinct"),
    (lambda c: c.update(student=3), "student: expected a modality name"),
    (lambda c: c.update(student="audio"), "student, teachers: expected distinct modalities among"),
    (lambda c: c.update(metadata=[1]), "metadata: expected a JSON object"),
    (lambda c: c.update(gmm=[]), "gmm: expected null or a JSON object"),
    (lambda c: c["gmm"].pop("tol"), "gmm: expected the settings .* missing tol"),
    (lambda c: c["gmm"].update(n_components="2"), "gmm.n_components: expected an integer >= 1"),
    (lambda c: c["gmm"].update(tol=float("nan")), "gmm.tol: expected a finite number"),
    (lambda c: c["gmm"].update(covariance_type="round"), "gmm.covariance_type: expected one of full"),
    (lambda c: c["gmm"]["fitted"].update(__class__="x"), "gmm.fitted: expected an object with keys among"),
    (lambda c: c["gmm"]["fitted"].update(n_iter_="9"), "gmm.fitted.n_iter_: expected null or an integer"),
    (lambda c: c.update(format_version="1"), "version '1'"),
])
def test_tampered_bank_json_raises_bank_format_error(saved, edit, message):
    _, folder = saved
    _edit_json(folder, edit)
    with pytest.raises(BankFormatError, match=message) as caught:
        EmbeddingBank.load(folder)
    assert "bank.json" in str(caught.value)
    assert isinstance(caught.value, CMDAError) and not isinstance(caught.value, (KeyError, TypeError))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(files={"bank.safetensors": {"bytes": "1"}}), "files: expected"),
    (lambda c: c.update(files=[]), "files: expected"),
    (lambda c: c["files"]["bank.safetensors"].update(sha256="0" * 63), "files: expected"),
    (lambda c: c.update(checksum=7), "checksum: expected a SHA-256 hex digest"),
])
def test_tampered_integrity_records_raise_bank_format_error(saved, edit, message):
    _, folder = saved
    _edit_json(folder, edit, reseal=False)
    with pytest.raises(BankFormatError, match=message) as caught:
        EmbeddingBank.load(folder)
    assert "bank.json" in str(caught.value)
    assert isinstance(caught.value, CMDAError) and not isinstance(caught.value, (KeyError, TypeError))


@pytest.mark.parametrize("text", ['["not", "an", "object"]', "{", '{"rows": 1} trailing', "\udcff", "[" * 100000])
def test_bank_json_that_is_not_a_json_object(saved, text):
    _, folder = saved
    (folder / "bank.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(BankFormatError, match=r"bank\.json: expected (valid JSON|a JSON object)"):
        EmbeddingBank.load(folder)


def test_arguments_of_load_are_checked(saved):
    _, folder = saved
    with pytest.raises(ValidationError, match="verify: expected True or False, got 'yes'"):
        EmbeddingBank.load(folder, verify="yes")
    with pytest.raises(ValidationError, match="mmap: expected True, False, 'copy' or 'readonly', got \\[\\]"):
        EmbeddingBank.load(folder, mmap=[])
    with pytest.raises(ValidationError, match="path: expected a folder written by EmbeddingBank.save"):
        EmbeddingBank.load(folder / "nothing")


# -- 5. memory-mapped loading ---------------------------------------------------------------------------
def _private_dirty_kib() -> int:
    """Memory only this process holds and has written (a private copy), in KiB.

    Pages of a mapped file that are only read are clean (and shared through the page cache);
    a copy of the embeddings, in this process or in a worker writing to pages inherited from
    its parent, is private and dirty.
    """
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError("no Private_Dirty line")  # pragma: no cover


def _touch(bank: EmbeddingBank) -> float:
    """Read every embedding (no temporary as large as a table)."""
    return sum(float(t.sum(dtype=torch.float64)) for t in bank.embeddings.values())


def _mapped_file(tensor: torch.Tensor) -> str:
    """The file behind the mapping that holds ``tensor``'s data ('' for anonymous memory)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in parts[0].split("-"))
        if low <= address < high:
            return parts[5] if len(parts) == 6 else ""
    return ""


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """A bank of 2 x 16384 x 256 float32 embeddings: 32 MiB, 16 MiB per modality."""
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(16384, 256, generator=g), dim=1)
    bank = EmbeddingBank({"image": z, "text": z.flip(1)}, student="image", teachers="text")
    return bank.save(tmp_path_factory.mktemp("big") / "bank")


@pytest.mark.parametrize("mmap", [True, "copy", "readonly"])
def test_mmap_load_is_file_backed_and_equals_the_plain_load(big_folder, mmap):
    plain = EmbeddingBank.load(big_folder, mmap=False)
    before = _private_dirty_kib()
    mapped = EmbeddingBank.load(big_folder, mmap=mmap)  # verified: the hash streams the file
    total = _touch(mapped)  # every page read
    grown = _private_dirty_kib() - before
    assert grown < 32 * 1024 // 4, f"{grown} KiB of private memory for 32 MiB of mapped embeddings"
    for m in plain.modalities:
        assert torch.equal(plain.embeddings[m], mapped.embeddings[m])
        assert _mapped_file(mapped.embeddings[m]) == str(big_folder / "bank.safetensors")
        assert _mapped_file(plain.embeddings[m]) != str(big_folder / "bank.safetensors")
    assert total == _touch(plain)


class _LoadInWorker(Dataset):
    """Each worker loads the bank itself (as under spawn), reads every row, reports its private memory."""

    def __init__(self, folder: Path, mmap) -> None:
        self.folder, self.mmap = folder, mmap

    def __len__(self) -> int:
        return get_worker_info().num_workers if get_worker_info() else 1

    def __getitem__(self, i: int):
        before = _private_dirty_kib()
        bank = EmbeddingBank.load(self.folder, mmap=self.mmap)
        total = _touch(bank)
        return torch.tensor([_private_dirty_kib() - before]), torch.tensor([total], dtype=torch.float64)


def test_dataloader_workers_share_one_mapped_copy(big_folder):
    """Two workers each load the 32 MiB bank: mapped, neither holds a private copy; read, both do."""
    reference = _touch(EmbeddingBank.load(big_folder, mmap=False))
    for mmap, low, high in ((True, 0, 8 * 1024), (False, 30 * 1024, None)):
        loader = DataLoader(_LoadInWorker(big_folder, mmap), batch_size=None, num_workers=2,
                            sampler=[0, 1], multiprocessing_context="fork")
        results = list(loader)
        assert len(results) == 2
        for grown, total in results:
            assert float(total) == pytest.approx(reference, rel=1e-12)  # summed by other threads
            assert int(grown) >= low and (high is None or int(grown) < high), (mmap, int(grown))


class _WriteInWorker(Dataset):
    def __init__(self, bank: EmbeddingBank) -> None:
        self.bank = bank

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        self.bank.embeddings["image"][0, 0] = 42.0  # a stray in-place write in a worker
        return self.bank.embeddings["image"][0, 0].clone()


def test_a_write_to_a_mapped_bank_reaches_neither_the_file_nor_other_processes(big_folder):
    bank = EmbeddingBank.load(big_folder)
    original = float(bank.embeddings["image"][0, 0])
    written = next(iter(DataLoader(_WriteInWorker(bank), batch_size=None, num_workers=1)))
    assert float(written) == 42.0  # the worker's own copy-on-write page
    assert float(bank.embeddings["image"][0, 0]) == original  # the main process: untouched
    again = EmbeddingBank.load(big_folder)  # the file: untouched (its SHA-256 still verifies)
    assert float(again.embeddings["image"][0, 0]) == original


def test_readonly_mapped_bank_refuses_a_write(big_folder):
    code = ("import torch\nfrom cmda_data import EmbeddingBank\n"
            f"bank = EmbeddingBank.load({str(big_folder)!r}, mmap='readonly')\n"
            "print('loaded', flush=True)\nbank.embeddings['image'][0, 0] = 42.0\nprint('written', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["loaded"] and done.returncode != 0, done.stderr[-2000:]
    assert float(EmbeddingBank.load(big_folder).embeddings["image"][0, 0]) != 42.0
