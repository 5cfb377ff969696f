"""The disk-backed bank build, ``EmbeddingBank.build(..., out=folder)`` (issue 15, item 5).

Reference: the in-memory build + ``save`` with the same arguments. The disk-backed build must
write the same folder byte for byte (same embeddings, same GMM on the same subsample, same
responsibilities, same bank.json), refuse a saved bank without ``overwrite``, leave nothing
behind when it fails, and hold far less than a table in memory (measured in a fresh process).
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from cmda_data import CMDAError, EmbeddingBank
from cmda_data.bank import _disk, _fit
from cmda_data.bank._format import CONFIG_NAME, TENSORS_NAME
from cmda_data.exceptions import BankFormatError, ShapeError, ValidationError

ROOT = Path(__file__).resolve().parents[1]


def blobs(n: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    """Three separated clusters."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, d, generator=g) * 6
    return centers[torch.randint(0, 3, (n,), generator=g)] + torch.randn(n, d, generator=g)


class Pairs(torch.utils.data.Dataset):
    def __init__(self, z: torch.Tensor) -> None:
        self.z = z

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int):
        return {"image": self.z[i], "text": self.z[i]}


class Stream(IterableDataset):
    def __init__(self, z: torch.Tensor) -> None:
        self.z = z

    def __iter__(self):
        for row in self.z:
            yield {"image": row, "text": row}


class Aligner:
    """Two modalities that differ (the text is flipped and scaled); ``fail_at``: raise on that call."""

    modalities = ("image", "text")

    def __init__(self, fail_at: int = -1, nan_at: int = -1) -> None:
        self.calls, self.fail_at, self.nan_at = 0, fail_at, nan_at

    def embed(self, modality: str, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("encoder crashed")
        out = batch.float() if modality == "image" else 2 * batch.float().flip(1)
        if self.calls == self.nan_at:
            out = out.clone()
            out[1, 2] = float("nan")
        return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_folder(a: Path, b: Path) -> bool:
    return all(sha(a / name) == sha(b / name) for name in (TENSORS_NAME, CONFIG_NAME))


def listing(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- the same bank as build + save ---------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"max_fit_rows": 400, "candidates": [1, 2, 3, 4]},  # BIC choice on a subsample
    {"max_fit_rows": 400, "reduce_dim": 3, "n_components": 3},  # PCA before the GMM
    {"n_components": 2, "fit_on": "student", "covariance_type": "diag"},  # whole table, other modality
    {"fit_gmm": False},
], ids=["bic-subsample", "pca", "student-diag", "no-gmm"])
@pytest.mark.parametrize("shard", [False, True], ids=["all", "indices"])
def test_disk_build_writes_the_folder_of_build_and_save(tmp_path, monkeypatch, options, shard):
    monkeypatch.setattr(_fit, "RESP_CHUNK_ROWS", 256)  # several chunks, the last one short
    z = blobs(1500)
    indices = list(range(1, 1500, 2)) if shard else None
    common = dict(student="image", teachers="text", batch_size=64, progress=False, indices=indices, **options)
    memory = EmbeddingBank.build(Pairs(z), Aligner(), **common)
    memory.save(tmp_path / "memory")
    disk = EmbeddingBank.build(Pairs(z), Aligner(), out=tmp_path / "disk", **common)
    assert same_folder(tmp_path / "memory", tmp_path / "disk")  # byte for byte: embeddings, GMM, responsibilities
    assert listing(tmp_path) == sorted(["memory", "disk"] + [f"{f}/{n}" for f in ("memory", "disk")
                                                            for n in (CONFIG_NAME, TENSORS_NAME)])
    # the bank returned is the folder, memory-mapped, and equal to the in-memory one
    assert len(disk) == len(memory) == (750 if shard else 1500)
    for modality in ("image", "text"):
        assert torch.equal(disk.embeddings[modality], memory.embeddings[modality])
    if options.get("fit_gmm", True):
        assert torch.equal(disk.responsibilities, memory.responsibilities)
        assert disk.n_components == memory.n_components and disk.metadata == memory.metadata
    assert (disk.indices is None) == (not shard)
    if shard:
        assert disk.indices.tolist() == indices
    again = EmbeddingBank.load(tmp_path / "disk", verify=True)
    assert torch.equal(again.embeddings["text"], memory.embeddings["text"])


def test_disk_build_of_a_stream_equals_the_in_memory_build(tmp_path, monkeypatch):
    monkeypatch.setattr(_fit, "RESP_CHUNK_ROWS", 300)
    z = blobs(1234, seed=1)
    common = dict(student="image", teachers=["text"], batch_size=100, progress=False, max_fit_rows=500)
    EmbeddingBank.build(Stream(z), Aligner(), **common).save(tmp_path / "memory")
    disk = EmbeddingBank.build(Stream(z), Aligner(), out=tmp_path / "disk", **common)
    assert same_folder(tmp_path / "memory", tmp_path / "disk")
    assert len(disk) == 1234 and disk.indices is None and disk.n_components == 3
    assert torch.equal(disk.embeddings["image"], z)


def test_disk_build_shows_progress_bars(tmp_path, capsys):
    pytest.importorskip("tqdm")
    EmbeddingBank.build(Pairs(blobs(300)), Aligner(), student="image", teachers="text", n_components=2,
                        out=tmp_path / "bank", progress=True)
    assert "embedding" in capsys.readouterr().err


# -- the folder: refused, replaced, created --------------------------------------------------------
def test_a_saved_bank_is_refused_before_anything_is_embedded(tmp_path):
    z = blobs(200)
    first = EmbeddingBank.build(Pairs(z), Aligner(), student="image", teachers="text", n_components=2,
                                out=tmp_path / "bank", progress=False)
    before = sha(tmp_path / "bank" / TENSORS_NAME)
    aligner = Aligner()
    with pytest.raises(ValidationError, match=r"^out: expected a folder without a saved bank \(pass overwrite=True"):
        EmbeddingBank.build(Pairs(z * 2), aligner, student="image", teachers="text", out=tmp_path / "bank",
                            progress=False)
    assert aligner.calls == 0 and sha(tmp_path / "bank" / TENSORS_NAME) == before
    # overwrite=True replaces it; the bank loaded before keeps its own (now unlinked) file
    second = EmbeddingBank.build(Pairs(z * 2), aligner, student="image", teachers="text", n_components=2,
                                 out=tmp_path / "bank", overwrite=True, progress=False)
    assert torch.equal(second.embeddings["image"], z * 2) and torch.equal(first.embeddings["image"], z)
    assert listing(tmp_path) == ["bank", f"bank/{CONFIG_NAME}", f"bank/{TENSORS_NAME}"]


def test_an_existing_folder_without_a_bank_is_used_and_missing_parents_are_made(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    EmbeddingBank.build(Pairs(blobs(100)), Aligner(), student="image", teachers="text", n_components=1,
                        out=tmp_path / "keep", progress=False)
    assert listing(tmp_path / "keep") == sorted([CONFIG_NAME, TENSORS_NAME, "notes.txt"])
    bank = EmbeddingBank.build(Pairs(blobs(100)), Aligner(), student="image", teachers="text", n_components=1,
                               out=str(tmp_path / "a" / "b" / "bank"), progress=False)
    assert len(bank) == 100 and (tmp_path / "a" / "b" / "bank" / CONFIG_NAME).is_file()
    # made like any folder (the umask's permissions), not with the private mode of the temporary one
    (tmp_path / "plain").mkdir()
    mode = (tmp_path / "plain").stat().st_mode & 0o777
    assert [(tmp_path / p).stat().st_mode & 0o777 for p in ("a", "a/b", "a/b/bank")] == [mode] * 3


@pytest.mark.parametrize("kwargs, message", [
    ({"out": 3}, r"^out: expected a folder path"),
    ({"out": "FILE"}, r"^out: expected a folder for the bank .*a file"),
    ({"out": "new", "overwrite": "yes"}, r"^overwrite: expected True or False"),
    ({"overwrite": True}, r"^overwrite: expected False without out"),
    ({"out": "new", "fit_gmm": 1}, r"^fit_gmm: expected True or False"),
    ({"out": "new", "fit_on": "audio"}, r"fit_on"),
])
def test_bad_out_arguments_name_the_argument(tmp_path, kwargs, message):
    (tmp_path / "FILE").write_text("x")
    if isinstance(kwargs.get("out"), str):
        kwargs = dict(kwargs, out=tmp_path / kwargs["out"])
    aligner = Aligner()
    with pytest.raises(CMDAError, match=message):
        EmbeddingBank.build(Pairs(blobs(50)), aligner, student="image", teachers="text", progress=False, **kwargs)
    assert aligner.calls == 0 and listing(tmp_path) == ["FILE"]


# -- failures leave nothing behind ----------------------------------------------------------------
@pytest.mark.parametrize("failure", ["aligner raises", "NaN embedding", "GMM refuses", "empty stream"])
def test_a_failed_build_leaves_nothing_behind(tmp_path, failure):
    old = tmp_path / "old"
    EmbeddingBank.build(Pairs(blobs(300)), Aligner(), student="image", teachers="text", n_components=2,
                        out=old, progress=False)
    saved = {name: sha(old / name) for name in (TENSORS_NAME, CONFIG_NAME)}
    before = listing(tmp_path)
    dataset, aligner, options, error = Pairs(blobs(600)), Aligner(), {}, CMDAError
    if failure == "aligner raises":
        aligner, error = Aligner(fail_at=7), RuntimeError  # midway through the embedding
    elif failure == "NaN embedding":
        aligner = Aligner(nan_at=6)
    elif failure == "GMM refuses":
        options = {"n_components": 10_000}  # more components than rows: after every row is on disk
    else:
        dataset = Stream(torch.zeros(0, 6))
    for out in (old, tmp_path / "new" / "deeper" / "bank"):  # replacing a bank, or making a new one
        with pytest.raises(error):
            EmbeddingBank.build(dataset, aligner, student="image", teachers="text", batch_size=50, out=out,
                                overwrite=True, progress=False, **options)
        assert listing(tmp_path) == before  # no temporary folder, no new parent folders
        assert {name: sha(old / name) for name in saved} == saved  # the old bank is untouched
        aligner.calls = 0


def fail_moves(monkeypatch, fail_at: int) -> None:
    """The ``fail_at``-th ``os.replace`` of the final move (old bank aside, new one in) raises."""
    real_move, real_replace = _disk._move_into_place, os.replace
    calls = []

    def flaky(source, target):
        calls.append(source)
        if len(calls) == fail_at:
            raise OSError("disk gone")
        return real_replace(source, target)

    def move(work, folder):
        monkeypatch.setattr(os, "replace", flaky)
        try:
            real_move(work, folder)
        finally:
            monkeypatch.setattr(os, "replace", real_replace)

    monkeypatch.setattr(_disk, "_move_into_place", move)


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_failed_move_puts_the_old_bank_back(tmp_path, monkeypatch, fail_at):
    """Replacing a bank: a failure at any rename leaves the old bank whole (never the new tensors
    beside the old bank.json) and no temporary folder."""
    old = tmp_path / "bank"
    EmbeddingBank.build(Pairs(blobs(200)), Aligner(), student="image", teachers="text", n_components=2,
                        out=old, progress=False)
    saved = {name: sha(old / name) for name in (TENSORS_NAME, CONFIG_NAME)}
    fail_moves(monkeypatch, fail_at)
    with pytest.raises(OSError, match="disk gone"):
        EmbeddingBank.build(Pairs(blobs(200, seed=3)), Aligner(), student="image", teachers="text",
                            n_components=2, out=old, overwrite=True, progress=False)
    assert listing(tmp_path) == ["bank", f"bank/{CONFIG_NAME}", f"bank/{TENSORS_NAME}"]
    assert {name: sha(old / name) for name in saved} == saved
    EmbeddingBank.load(old, verify=True)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failed_move_into_a_new_folder_removes_it(tmp_path, monkeypatch, fail_at):
    fail_moves(monkeypatch, fail_at)
    with pytest.raises(OSError, match="disk gone"):
        EmbeddingBank.build(Pairs(blobs(200)), Aligner(), student="image", teachers="text", n_components=2,
                            out=tmp_path / "new" / "bank", progress=False)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("disk", [True, False], ids=["out", "in-memory"])
@pytest.mark.parametrize("option, value", [
    ("covariance_type", "ful"), ("criterion", "bi"), ("reduce_dim", 0), ("max_fit_rows", 0),
    ("n_components", 0), ("max_itr", 5), ("field", "text"),  # unknown keywords: not a raw TypeError
])
def test_a_bad_fit_option_is_refused_before_anything_is_embedded(tmp_path, disk, option, value):
    aligner = Aligner()
    with pytest.raises(CMDAError, match=rf"^{option}: expected"):
        EmbeddingBank.build(Pairs(blobs(50)), aligner, student="image", teachers="text", progress=False,
                            out=tmp_path / "bank" if disk else None, **{option: value})
    assert aligner.calls == 0 and listing(tmp_path) == []


def test_from_embeddings_names_an_unknown_option():
    z = blobs(50)
    with pytest.raises(ValidationError, match=r"^max_itr: expected a keyword argument of "
                                              r"EmbeddingBank.from_embeddings or a GaussianMixture setting"):
        EmbeddingBank.from_embeddings({"image": z, "text": z}, student="image", teachers="text", max_itr=5)


def test_out_on_another_file_system_is_built_in_place(tmp_path, monkeypatch):
    """``out`` a mount point: a rename across its boundary fails with EXDEV (simulated), so the
    temporary folder must be on its side of it."""
    out = tmp_path / "mount"
    out.mkdir()
    inside = str(out) + os.sep
    real_replace = os.replace

    def replace(source, target):
        if str(source).startswith(inside) != str(target).startswith(inside):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    bank = EmbeddingBank.build(Pairs(blobs(100)), Aligner(), student="image", teachers="text", n_components=1,
                               out=out, progress=False)
    assert len(bank) == 100 and listing(tmp_path) == ["mount", f"mount/{CONFIG_NAME}", f"mount/{TENSORS_NAME}"]


def test_an_existing_out_under_a_read_only_parent_is_built(tmp_path):
    parent = tmp_path / "shared"
    (parent / "bank").mkdir(parents=True)
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("this user (root) writes into a read-only folder")
        EmbeddingBank.build(Pairs(blobs(100)), Aligner(), student="image", teachers="text", n_components=1,
                            out=parent / "bank", progress=False)
        assert listing(parent) == ["bank", f"bank/{CONFIG_NAME}", f"bank/{TENSORS_NAME}"]
    finally:
        parent.chmod(0o755)


def test_the_constructor_has_no_private_flags():
    """load skips the value scan through a private path, not a flag of the public signature."""
    assert not [name for name in inspect.signature(EmbeddingBank).parameters if name.startswith("_")]


def test_a_nan_embedding_is_reported_with_its_rows(tmp_path):
    with pytest.raises(ValidationError, match=r"embeddings\['text'\]: expected finite values .*rows 100\.\.149"):
        EmbeddingBank.build(Pairs(blobs(300)), Aligner(nan_at=6), student="image", teachers="text",
                            batch_size=50, out=tmp_path / "bank", progress=False)


def test_a_damaged_result_is_refused_on_load(tmp_path):
    """The folder carries valid integrity records: a flipped byte is seen by load(verify=True)."""
    EmbeddingBank.build(Pairs(blobs(400)), Aligner(), student="image", teachers="text", n_components=2,
                        out=tmp_path / "bank", progress=False)
    record = json.loads((tmp_path / "bank" / CONFIG_NAME).read_text())["files"][TENSORS_NAME]
    assert record["sha256"] == sha(tmp_path / "bank" / TENSORS_NAME)
    data = bytearray((tmp_path / "bank" / TENSORS_NAME).read_bytes())
    data[-5] ^= 1
    (tmp_path / "bank" / TENSORS_NAME).write_bytes(bytes(data))
    with pytest.raises(BankFormatError, match="SHA-256"):
        EmbeddingBank.load(tmp_path / "bank", verify=True)


def test_modalities_of_different_widths_are_refused(tmp_path):
    class Widths(Aligner):
        def embed(self, modality, batch):
            out = super().embed(modality, batch)
            return out if modality == "image" else out[:, :4]

    with pytest.raises(ShapeError, match=r"embeddings\['text'\]: expected \[N, 6\] like the other modalities"):
        EmbeddingBank.build(Pairs(blobs(100)), Widths(), student="image", teachers="text", out=tmp_path / "bank",
                            progress=False)
    assert listing(tmp_path) == []


# -- memory, in a fresh process --------------------------------------------------------------------
MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, torch
    from pathlib import Path
    from cmda_data import EmbeddingBank

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    class Rows:  # embeds by index: rows made from the indices (nothing held between calls)
        modalities = ("image", "text")
        embeds_by_index = True
        def embed(self, modality, idx):
            g = torch.Generator().manual_seed(int(idx[0]) * 2 + (modality == "text"))
            centers = torch.tensor([-4.0, 4.0])[idx % 2].unsqueeze(1)
            return centers + torch.randn(len(idx), int(sys.argv[3]), generator=g)

    n, mode = int(sys.argv[2]), sys.argv[1]
    EmbeddingBank.build(range(64), Rows(), student="image", teachers="text", n_components=2, progress=False)
    before = hwm()  # imports and a first small build: the baseline
    options = dict(student="image", teachers="text", n_components=2, batch_size=1024, progress=False,
                   max_fit_rows=5000)  # the fit's own memory does not grow with N: keep it small here
    if mode == "disk":
        bank = EmbeddingBank.build(range(n), Rows(), out=Path(sys.argv[4]), overwrite=True, **options)
    else:
        bank = EmbeddingBank.build(range(n), Rows(), **options)
    print(json.dumps({"growth": hwm() - before, "rows": len(bank)}))
""")


def peak_growth(mode: str, tmp_path: Path, n: int, d: int) -> int:
    # A fixed glibc mmap threshold: by default it rises after each free of a large block, and
    # later blocks of that size then come from the heap, whose peak depends on the order of the
    # frees (the same disk build peaked anywhere from 44 to 76 MB over the baseline). Fixed, every
    # block >= 64 KiB is its own mapping and goes back on free: the peak is what is held at once.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, mode, str(n), str(d), str(tmp_path / mode)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rows"] == n
    return result["growth"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc/self/status (Linux)")
def test_disk_build_memory_does_not_grow_with_the_bank(tmp_path):
    """Peak RSS growth (VmHWM) over the baseline, in fresh processes, at d = 128. The in-memory build of
    200,000 rows holds both tables (2 x 102 MB); the disk-backed one (with the load of the result,
    memory-mapped: the load maps no page) holds a batch, the fit's subsample and a chunk of the
    responsibilities pass, whatever N: doubling N to 400,000 rows (102 MB more per table) adds
    almost nothing to its peak."""
    n, d = 200_000, 128
    table = n * d * 4
    assert peak_growth("memory", tmp_path, n, d) > 1.5 * table  # the measure sees the tables
    small, large = peak_growth("disk", tmp_path, n, d), peak_growth("disk", tmp_path, 2 * n, d)
    assert large - small < 0.25 * table
    assert large < 2 * table  # and even the fixed costs stay below one table of 400,000 rows
