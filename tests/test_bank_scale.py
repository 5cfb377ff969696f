"""Banks at scale: the GMM fitted on a random subsample, responsibilities in chunks, the build
filling one preallocated table per modality, mmapped banks shared by DataLoader workers, and
``benchmarks/bench_bank.py --quick`` end to end. References: scikit-learn's GaussianMixture
(fitted on the same rows, or given our parameters) and hand-made aligner outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from torch.utils.data import DataLoader, Dataset

from cmda_data.bank import EmbeddingBank, _fit
from cmda_data.bank._build import embed_dataset
from cmda_data.core.mixture import GaussianMixture, select_n_components
from cmda_data.exceptions import ShapeError, ValidationError

ROOT = Path(__file__).resolve().parents[1]


def clusters(n: int, d: int = 6, k: int = 3, seed: int = 0) -> torch.Tensor:
    """``k`` well separated Gaussian blobs (random full covariances)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 8
    mix = torch.randn(k, d, d, generator=g) / d ** 0.5
    labels = torch.randint(0, k, (n,), generator=g)
    return centers[labels] + torch.einsum("nd,nde->ne", torch.randn(n, d, generator=g), mix[labels])


def sklearn_with(gmm: GaussianMixture) -> SkGaussianMixture:
    """A scikit-learn mixture holding our fitted parameters (its own E-step is the reference)."""
    sk = SkGaussianMixture(gmm.n_components, covariance_type=gmm.covariance_type)
    sk.weights_, sk.means_ = gmm.weights_.numpy(), gmm.means_.numpy()
    sk.covariances_, sk.precisions_cholesky_ = gmm.covariances_.numpy(), gmm.precisions_cholesky_.numpy()
    sk.precisions_ = gmm.precisions_.numpy()
    return sk


# -- the subsample -------------------------------------------------------------------------------
def test_large_bank_fits_on_a_subsample_and_matches_sklearn_there(monkeypatch):
    monkeypatch.setattr(_fit, "RESP_CHUNK_ROWS", 700)  # several chunks, the last one short
    z = clusters(3000)
    bank = EmbeddingBank.from_embeddings({"image": z.flip(0), "text": z}, student="image", teachers="text",
                                         candidates=[1, 2, 3, 4], max_fit_rows=1000)
    rows = _fit.fit_subsample(3000, 1000, 0)
    assert bank.metadata["fit_rows"] == 1000 and len(rows) == len(set(rows.tolist())) == 1000
    sample = z[rows].double().numpy()
    # the choice of M and the fit: scikit-learn on the same rows finds the same optimum
    assert bank.n_components == 3
    sk = SkGaussianMixture(3, random_state=0).fit(sample)
    assert sklearn_with(bank.gmm).score(sample) == pytest.approx(sk.score(sample), rel=1e-6)
    # the BIC table holds the BIC of the kept model on the subsample (scikit-learn's formula, our parameters)
    bic = bank.metadata["n_components_scores"]["3"]
    assert bic == pytest.approx(sklearn_with(bank.gmm).bic(sample), rel=1e-10)
    assert bic < min(s for m, s in bank.metadata["n_components_scores"].items() if m != "3")
    # every row gets responsibilities (computed in chunks): scikit-learn's E-step with our parameters
    assert bank.responsibilities.shape == (3000, 3)
    expected = sklearn_with(bank.gmm).predict_proba(z.double().numpy())
    np.testing.assert_allclose(bank.responsibilities.numpy(), expected, atol=1e-6)


def test_the_subsample_is_uniform_and_reproducible():
    a, b = _fit.fit_subsample(100_000, 5000, 7), _fit.fit_subsample(100_000, 5000, 7)
    assert torch.equal(a, b) and not torch.equal(a, _fit.fit_subsample(100_000, 5000, 8))
    assert bool((a[1:] > a[:-1]).all())  # sorted, unique
    # uniform: each tenth of the rows holds about a tenth of the subsample (binomial sd ~ 21)
    counts = torch.bincount(a // 10_000, minlength=10)
    assert int(counts.min()) > 400 and int(counts.max()) < 600
    g = torch.Generator().manual_seed(0)
    first, second = _fit.fit_subsample(50, 10, g), _fit.fit_subsample(50, 10, g)
    assert not torch.equal(first, second)  # a generator is advanced
    assert _fit.fit_subsample(50, 50, 0) is None and _fit.fit_subsample(50, None, 0) is None


def test_small_banks_are_fitted_on_every_row_as_before():
    z = clusters(400)
    bank = EmbeddingBank.from_embeddings({"image": z, "text": z}, student="image", teachers="text",
                                         candidates=[1, 2, 3])
    assert bank.metadata["fit_rows"] == 400
    reference = GaussianMixture(bank.n_components, random_state=0).fit(z)
    torch.testing.assert_close(bank.gmm.means_, reference.means_, rtol=0, atol=0)
    torch.testing.assert_close(bank.responsibilities, reference.predict_proba(z).float())
    everything = EmbeddingBank.from_embeddings({"image": z, "text": z}, student="image", teachers="text",
                                               candidates=[1, 2, 3], max_fit_rows=None)
    assert torch.equal(everything.responsibilities, bank.responsibilities)


def test_n_components_given_uses_the_subsample_too():
    z = clusters(2000)
    bank = EmbeddingBank.from_embeddings({"image": z, "text": z}, student="image", teachers="text",
                                         n_components=3, max_fit_rows=500)
    reference = GaussianMixture(3, random_state=0).fit(z[_fit.fit_subsample(2000, 500, 0)])
    torch.testing.assert_close(bank.gmm.means_, reference.means_, rtol=0, atol=0)
    assert bank.metadata["fit_rows"] == 500 and bank.responsibilities.shape == (2000, 3)


def test_bad_max_fit_rows_is_refused():
    z = clusters(50)
    for bad in (0, -3, 2.5, "many"):
        with pytest.raises(ValidationError, match="max_fit_rows"):
            EmbeddingBank.from_embeddings({"image": z, "text": z}, student="image", teachers="text",
                                          max_fit_rows=bad)


def test_bic_table_reuses_the_fit_and_equals_a_fresh_score():
    """select_n_components scores with the last E-step of each fit: the same as bic(X) recomputed."""
    z = clusters(600, d=4)
    for criterion in ("bic", "aic"):
        best, scores = select_n_components(z, [1, 2, 3, 4], criterion=criterion, random_state=0)
        for m, score in scores.items():
            model = GaussianMixture(m, random_state=0).fit(z)
            fresh = model.bic(z) if criterion == "bic" else model.aic(z)
            assert score == pytest.approx(fresh, rel=1e-10)
            sk = sklearn_with(model)
            assert score == pytest.approx(sk.bic(z.double().numpy()) if criterion == "bic"
                                          else sk.aic(z.double().numpy()), rel=1e-10)
        assert best == min(scores, key=lambda m: (scores[m], m))


# -- the build fills one table per modality ------------------------------------------------------------
class Widths:
    """Embeds by index: row i of ``table``; ``widths`` lets a later batch change its width."""

    modalities = ("image", "text")
    embeds_by_index = True

    def __init__(self, table: torch.Tensor, dtype=torch.float16, shrink_at: int = -1) -> None:
        self.table, self.dtype, self.shrink_at, self.calls = table, dtype, shrink_at, 0

    def embed(self, modality, indices):
        self.calls += 1
        out = self.table[indices].to(self.dtype)
        return out[:, :-1] if self.calls == self.shrink_at else out


def test_build_tables_equal_the_aligner_rows_in_order():
    table = torch.randn(1000, 5, generator=torch.Generator().manual_seed(1))
    embeddings, held = embed_dataset(range(1000), Widths(table), ["image", "text"], fields=None, batch_size=64,
                                     device=None, progress=False, indices=range(999, 99, -1))
    assert held.tolist() == list(range(100, 1000))  # sorted dataset indices
    for z in embeddings.values():
        assert z.dtype == torch.float32 and z.is_contiguous()
        torch.testing.assert_close(z, table[100:].half().float(), rtol=0, atol=0)


def test_build_refuses_a_batch_of_another_width():
    table = torch.randn(300, 5)
    with pytest.raises(ShapeError, match=r"aligner.embed\('image', batch of 64\).*\[64, 5\]"):
        embed_dataset(range(300), Widths(table, shrink_at=5), ["image", "text"], fields=None, batch_size=64,
                      device=None, progress=False, indices=None)


# -- mmapped banks and DataLoader workers -----------------------------------------------------------
class ReadAll(Dataset):
    """Item i: the sum of a slice of bank rows, and this worker's USS once it has read them."""

    def __init__(self, bank, parts: int) -> None:
        self.bank, self.parts = bank, parts

    def __len__(self) -> int:
        return self.parts

    def __getitem__(self, i):
        n = len(self.bank)
        rows = torch.arange(i * n // self.parts, (i + 1) * n // self.parts)
        got = self.bank.rows(rows)
        total = sum(float(t.double().sum()) for t in got.embeddings.values())
        return total, psutil.Process().memory_full_info().uss


def test_mmapped_bank_is_shared_by_workers_not_copied(tmp_path):
    """Two workers read every row of a 192 MB bank: each holds far less than a copy of its own."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200_000, 120, generator=g)
    EmbeddingBank({"image": z, "text": z + 1}, student="image", teachers="text").save(tmp_path / "bank")
    bank = EmbeddingBank.load(tmp_path / "bank", mmap=True)
    size = sum(t.numel() * t.element_size() for t in bank.embeddings.values())
    loader = DataLoader(ReadAll(bank, parts=40), batch_size=None, num_workers=2)
    got = list(loader)
    expected = [float(bank.embedding("image", torch.arange(i * 5000, (i + 1) * 5000)).double().sum()
                      + bank.embedding("text", torch.arange(i * 5000, (i + 1) * 5000)).double().sum())
                for i in range(40)]
    assert [t for t, _ in got] == pytest.approx(expected, rel=1e-9)
    # a copy of the tables would make a worker's private memory exceed ``size`` (192 MB)
    assert max(uss for _, uss in got) < 0.4 * size


# -- the benchmark's quick preset -------------------------------------------------------------------
@pytest.mark.slow
def test_bench_bank_quick_preset(tmp_path):
    out = tmp_path / "bench_bank.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_bank.py"), "--quick", "--no-progress",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    build, workers, sk = result["build"], result["workers"], result["sklearn"]
    assert result["quick"] and result["config"]["n"] == 30_000 and result["config"]["d"] == 32
    assert build["fit_rows"] == _fit.MAX_FIT_ROWS < 30_000  # the subsample path ran
    assert build["embeddings_bytes"] == 2 * 30_000 * 32 * 4
    assert 0 < build["embed_s"] < build["build_s"] and build["peak_rss_build_bytes"] > 0
    # the default build is the disk-backed one; the in-memory peer wrote the same bank file
    memory = result["build_memory"]
    assert build["mode"] == "disk" and memory["mode"] == "memory" and result["same_bank_file"] is True
    assert build["bank_sha256"] == memory["bank_sha256"] and build["n_components"] == memory["n_components"]
    for key in ("choice_and_fit_s", "responsibilities_s", "write_s", "load_s"):
        assert 0 <= build[key] < build["build_s"]
    assert memory["peak_rss_save_bytes"] >= memory["peak_rss_build_bytes"] > 0
    ratios = result["ratios"]
    for key in ("build_peak_to_one_modality", "build_peak_to_embeddings", "memory_build_peak_to_one_modality",
                "memory_build_peak_to_embeddings"):
        assert ratios[key] > 0
    assert ratios["build_peak_to_one_modality"] == pytest.approx(2 * ratios["build_peak_to_embeddings"])
    assert set(result["targets"]) >= {"build_s<=300", "build_peak<=2x_one_modality", "build_peak<=2x_embeddings"}
    # four well separated clusters: M = 4; where scikit-learn's own k-means start ends in another local
    # optimum, scikit-learn started from ours walks to our log-likelihood
    assert build["n_components"] == sk["m_ours"] == 4 and sk["fit_rows"] == build["fit_rows"]
    for row in sk["per_m"]:
        if "rel_diff_same_start" in row:
            assert row["rel_diff_same_start"] <= 1e-9
        elif row["m"] <= 4:  # up to the true M the optimum is unique: the two fits agree
            assert row["rel_diff"] <= 1e-6
    assert len(workers["per_worker"]) == 2
    for w in workers["per_worker"]:
        assert 0 < w["uss"] <= w["rss"] and (w["pss"] is None or w["uss"] <= w["pss"] <= w["rss"])
    assert out.with_suffix(".png").is_file()


# -- torchrun: the script of docs/howto/distributed.md ------------------------------------------------
def torchrun_script() -> str:
    text = (ROOT / "docs" / "howto" / "distributed.md").read_text(encoding="utf-8")
    (block,) = [b for b in text.split("```py\n")[1:] if b.startswith("# build_bank.py")]
    return block.split("```")[0]


@pytest.mark.slow
def test_torchrun_bank_build_of_the_docs_equals_one_process(tmp_path):
    """The docs' build_bank.py under torchrun: 2 gloo ranks (shards + all-gather) == 1 rank (plain build)."""
    script = tmp_path / "build_bank.py"
    script.write_text(torchrun_script())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    banks = {}
    for procs in (2, 1):
        out = tmp_path / f"bank{procs}"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={procs}", str(script), str(out)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        banks[procs] = EmbeddingBank.load(out)
    two, one = banks[2], banks[1]
    assert len(two) == 3000 and two.n_components == one.n_components == 3  # three clusters, chosen by BIC
    for modality in ("image", "text"):
        assert torch.equal(two.embeddings[modality], one.embeddings[modality])
    torch.testing.assert_close(two.responsibilities, one.responsibilities, rtol=0, atol=1e-6)


def test_save_with_progress_writes_the_same_bytes(tmp_path):
    from cmda_data.io._safetensors import _write_blocks

    blocks = [b"header", np.arange(1000, dtype=np.uint8), np.zeros(0, dtype=np.uint8), np.arange(7, dtype=np.uint8)]
    for progress in (False, True):
        pieces = list(_write_blocks(blocks, progress, size=64))
        assert max(len(p) for p in pieces) <= 64
        assert b"".join(bytes(p) for p in pieces) == b"".join(bytes(memoryview(b)) for b in blocks)
    z = clusters(500)
    bank = EmbeddingBank.from_embeddings({"image": z, "text": z}, student="image", teachers="text", n_components=2)
    bank.save(tmp_path / "a")
    bank.save(tmp_path / "b", progress=True)
    assert (tmp_path / "a" / "bank.safetensors").read_bytes() == (tmp_path / "b" / "bank.safetensors").read_bytes()
    assert torch.equal(EmbeddingBank.load(tmp_path / "b").responsibilities, bank.responsibilities)
