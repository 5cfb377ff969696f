"""EmbeddingBank: storage, GMM fit, validation, save/load (no pickle), shared memory, build."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import torch
from _entry_data import NUM_CLASSES, PairedDataset, TupleDataset, ValueOfBank, latents, make_bank
from conftest import CPU_AND_CUDA, needs_cuda
from torch import nn
from torch.utils.data import DataLoader

from cmda_data.aligners import ContrastiveAligner, PrecomputedAligner
from cmda_data.bank import EmbeddingBank
from cmda_data.core.mixture import GaussianMixture
from cmda_data.exceptions import DeviceError, ShapeError, ValidationError


def two_blobs(n: int = 60, d: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    return torch.cat([torch.randn(half, d, generator=g) - 5, torch.randn(n - half, d, generator=g) + 5])


# -- construction and the GMM ----------------------------------------------------------------
def test_from_embeddings_stores_float32_and_fits_gmm():
    z = two_blobs()
    bank = EmbeddingBank.from_embeddings({"image": z.double(), "text": z + 0.1}, student="image", teachers="text",
                                         n_components=2)
    assert len(bank) == 60 and bank.dim == 3 and bank.modalities == ("image", "text")
    assert bank.embeddings["image"].dtype == torch.float32
    assert bank.teachers == ("text",) and bank.fit_on == "text"
    resp = bank.responsibilities
    assert resp.shape == (60, 2)
    torch.testing.assert_close(resp.sum(1), torch.ones(60))
    # the two blobs are the two clusters
    clusters = resp.argmax(1)
    assert len(set(clusters[:30].tolist())) == 1 and len(set(clusters[30:].tolist())) == 1
    assert clusters[0] != clusters[-1]
    # same as the stored GMM applied to the teacher embeddings
    torch.testing.assert_close(resp, bank.gmm.predict_proba(bank.embeddings["text"]).float())


def test_n_components_chosen_by_bic_and_recorded():
    z = two_blobs(80)
    bank = EmbeddingBank.from_embeddings({"image": z, "text": z}, student="image", teachers=["text"],
                                         candidates=[1, 2, 3])
    scores = {int(m): s for m, s in bank.metadata["n_components_scores"].items()}
    assert sorted(scores) == [1, 2, 3]
    assert bank.n_components == min(scores, key=scores.get) == 2
    assert bank.metadata["criterion"] == "bic"
    # the table is the BIC of a GaussianMixture fitted with the same settings
    reference = GaussianMixture(2, random_state=0).fit(bank.embeddings["text"])
    assert scores[2] == pytest.approx(reference.bic(bank.embeddings["text"]), rel=1e-6)


@pytest.mark.parametrize("fit_on, expected", [("teacher", "text"), ("student", "image"), ("text", "text")])
def test_fit_on(fit_on, expected):
    z = latents(30)
    bank = EmbeddingBank.from_embeddings(z, student="image", teachers="text", fit_on=fit_on, n_components=2)
    assert bank.fit_on == expected
    torch.testing.assert_close(bank.responsibilities,
                               bank.gmm.predict_proba(bank.embeddings[expected]).float())


def test_fit_on_unknown_modality():
    with pytest.raises(ValidationError, match="fit_on: expected one of"):
        EmbeddingBank.from_embeddings(latents(10), student="image", teachers="text", fit_on="audio")


def test_reduce_dim_matches_sklearn_pca():
    from sklearn.decomposition import PCA

    z = latents(40, d=8)
    bank = EmbeddingBank.from_embeddings(z, student="image", teachers="text", n_components=2, reduce_dim=3)
    mean, components = bank.pca
    reference = PCA(3).fit(z["text"].double().numpy())
    np.testing.assert_allclose(mean.numpy(), reference.mean_, atol=1e-5)
    # principal axes agree up to sign
    dots = np.abs((components.double().numpy() * reference.components_).sum(1))
    np.testing.assert_allclose(dots, np.ones(3), atol=1e-4)
    assert bank.metadata["reduce_dim"] == 3
    torch.testing.assert_close(bank.responsibilities_for(bank.embeddings["text"]), bank.responsibilities)


def test_fit_gmm_false_has_no_responsibilities():
    bank = EmbeddingBank.from_embeddings(latents(10), student="image", teachers="text", fit_gmm=False)
    assert bank.responsibilities is None and bank.gmm is None and bank.n_components is None


# -- validation ---------------------------------------------------------------------------------
def test_mismatched_rows_between_modalities():
    with pytest.raises(ShapeError, match=r"embeddings\['text'\]: expected shape \(5, 4\) like embeddings\['image'\]"):
        EmbeddingBank({"image": torch.randn(5, 4), "text": torch.randn(6, 4)}, student="image", teachers="text")


def test_mismatched_dims_between_modalities():
    with pytest.raises(ShapeError, match="one latent space"):
        EmbeddingBank({"image": torch.randn(5, 4), "text": torch.randn(5, 3)}, student="image", teachers="text")


def test_unknown_modalities():
    z = {"image": torch.randn(5, 4), "text": torch.randn(5, 4)}
    with pytest.raises(ValidationError, match="student: expected a modality of the bank"):
        EmbeddingBank(z, student="audio", teachers="text")
    with pytest.raises(ValidationError, match="teachers: expected modalities of the bank"):
        EmbeddingBank(z, student="image", teachers=["audio"])
    with pytest.raises(ValidationError, match="teachers: expected modalities other than the student"):
        EmbeddingBank(z, student="image", teachers=["image"])
    with pytest.raises(ValidationError, match="teachers: expected at least one teacher"):
        EmbeddingBank(z, student="image", teachers=[])


def test_nan_embeddings_refused():
    bad = torch.randn(5, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValidationError, match=r"embeddings\['text'\]: expected finite values .* 1 non-finite"):
        EmbeddingBank({"image": torch.randn(5, 4), "text": bad}, student="image", teachers="text")


def test_wrong_rank_and_dtype():
    with pytest.raises(ShapeError, match=r"embeddings\['image'\]: expected a non-empty \[N, d\] tensor"):
        EmbeddingBank({"image": torch.randn(5), "text": torch.randn(5)}, student="image", teachers="text")
    with pytest.raises(ValidationError, match="expected a floating-point"):
        EmbeddingBank({"image": torch.ones(5, 2, dtype=torch.long), "text": torch.randn(5, 2)},
                      student="image", teachers="text")


def test_responsibilities_shape_checked():
    z = {"image": torch.randn(5, 4), "text": torch.randn(5, 4)}
    with pytest.raises(ShapeError, match=r"responsibilities: expected a \[5, M\] tensor"):
        EmbeddingBank(z, student="image", teachers="text", responsibilities=torch.rand(4, 2))


# -- lookups -------------------------------------------------------------------------------------
def test_rows_and_positions():
    bank = make_bank(10)
    rows = bank.rows([3, 1])
    torch.testing.assert_close(rows.embeddings["image"], bank.embeddings["image"][[3, 1]])
    torch.testing.assert_close(rows.responsibilities, bank.responsibilities[[3, 1]])
    with pytest.raises(ValidationError, match=r"index: expected a dataset index in \[0, 10\)"):
        bank.rows([10])


def test_subset_bank_maps_dataset_indices():
    z = latents(6)
    held = torch.tensor([1, 4, 7, 9, 12, 20])
    bank = EmbeddingBank(z, student="image", teachers="text", indices=held)
    torch.testing.assert_close(bank.embedding("image", [12, 1]), z["image"][[4, 0]])
    with pytest.raises(ValidationError, match="index: expected a dataset index held by this bank"):
        bank.embedding("image", [2])
    with pytest.raises(ValidationError, match="indices: expected sorted unique"):
        EmbeddingBank(z, student="image", teachers="text", indices=torch.tensor([1, 0, 2, 3, 4, 5]))


def test_plan_convenience_rows_sum_to_one():
    bank = make_bank(12)
    plan = bank.plan(list(range(12)), top_k=3, p=1.0, seed=1)
    assert plan.index.shape == (12, 3)
    torch.testing.assert_close(plan.weights.sum(1), torch.ones(12))
    again = bank.plan(list(range(12)), top_k=3, p=1.0, seed=1)
    assert torch.equal(plan.index, again.index) and torch.equal(plan.weights, again.weights)


# -- persistence -----------------------------------------------------------------------------------
def _tensors_equal(a: EmbeddingBank, b: EmbeddingBank) -> None:
    assert a.modalities == b.modalities and a.student == b.student and a.teachers == b.teachers
    for m in a.modalities:
        assert torch.equal(a.embeddings[m], b.embeddings[m])
    assert torch.equal(a.responsibilities, b.responsibilities)


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip_is_exact(tmp_path, mmap):
    bank = make_bank(30, reduce_dim=4, teachers=2)
    bank.save(tmp_path / "bank")
    loaded = EmbeddingBank.load(tmp_path / "bank", mmap=mmap)
    _tensors_equal(bank, loaded)
    for ours, theirs in zip(bank.pca, loaded.pca):
        assert torch.equal(ours, theirs)
    assert loaded.metadata == json.loads(json.dumps(bank.metadata))
    for key in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert torch.equal(getattr(bank.gmm, key), getattr(loaded.gmm, key))
    z = bank.embeddings["text"]
    assert torch.equal(bank.responsibilities_for(z), loaded.responsibilities_for(z))


def test_saved_folder_holds_no_pickle(tmp_path, monkeypatch):
    bank = make_bank(12)
    folder = bank.save(tmp_path / "bank")
    assert sorted(p.name for p in folder.iterdir()) == ["bank.json", "bank.safetensors"]
    config = json.loads((folder / "bank.json").read_text())
    assert config["student"] == "image" and config["teachers"] == ["text"]
    raw = (folder / "bank.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    assert {k for k in header if k != "__metadata__"} >= {"embeddings.image", "embeddings.text",
                                                          "responsibilities", "gmm.means_"}
    assert raw[8 + header_len:][:2] != b"\x80\x04"  # no pickle protocol marker at the data start

    def refuse(*args, **kwargs):
        raise AssertionError("pickle must not be used to load a bank")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = EmbeddingBank.load(folder)
    _tensors_equal(bank, loaded)


def test_load_with_mmap_maps_the_file(tmp_path):
    bank = make_bank(40)
    folder = bank.save(tmp_path / "bank")
    loaded = EmbeddingBank.load(folder, mmap=True)
    maps = open("/proc/self/maps").read()
    assert str(folder / "bank.safetensors") in maps
    assert torch.equal(loaded.embeddings["image"], bank.embeddings["image"])


def test_load_refuses_other_folders(tmp_path):
    with pytest.raises(ValidationError, match="path: expected a folder written by EmbeddingBank.save"):
        EmbeddingBank.load(tmp_path)
    folder = make_bank(8).save(tmp_path / "bank")
    config = json.loads((folder / "bank.json").read_text())
    config["format_version"] = 99
    (folder / "bank.json").write_text(json.dumps(config))
    with pytest.raises(ValidationError, match="version 99"):
        EmbeddingBank.load(folder)


# -- shared memory -----------------------------------------------------------------------------------
def test_share_memory_marks_every_tensor_shared():
    bank = make_bank(10)
    assert not bank.is_shared()
    assert bank.share_memory_() is bank
    assert bank.is_shared()
    assert all(t.is_shared() for t in bank.embeddings.values()) and bank.responsibilities.is_shared()


def test_workers_see_the_same_storage():
    """Persistent workers read a value written in place by the main process: one copy, no per-worker copy."""
    bank = make_bank(8).share_memory_()
    loader = DataLoader(ValueOfBank(bank), batch_size=4, num_workers=2, persistent_workers=True)
    first = torch.cat([values for values, _ in loader])
    shared = torch.cat([flags for _, flags in loader])
    assert shared.all()
    torch.testing.assert_close(first, bank.embeddings["image"][:4, 0])
    bank.embeddings["image"][:4, 0] = 42.0  # in place, after the workers exist
    second = torch.cat([values for values, _ in loader])
    assert torch.equal(second, torch.full((4,), 42.0))


# -- build with a real aligner -------------------------------------------------------------------------
def test_build_with_precomputed_aligner_matches_from_embeddings():
    z = latents(20)
    aligner = PrecomputedAligner({"image": z["image"], "text": z["text"]})
    data = PairedDataset(20)
    built = EmbeddingBank.build(data, aligner, student="image", teachers="text", batch_size=7, progress=False,
                                n_components=2)
    direct = EmbeddingBank.from_embeddings(z, student="image", teachers="text", n_components=2)
    torch.testing.assert_close(built.embeddings["image"], direct.embeddings["image"])
    torch.testing.assert_close(built.responsibilities, direct.responsibilities)


def _tiny_contrastive() -> ContrastiveAligner:
    return ContrastiveAligner({"image": nn.Flatten(), "text": nn.Identity()}, dim=4, head_hidden=(),
                              in_features={"image": 48, "text": 6}, seed=0)


def test_build_with_contrastive_aligner_on_fields():
    data = PairedDataset(18)
    aligner = _tiny_contrastive()
    bank = EmbeddingBank.build(data, aligner, student="image", teachers="text", batch_size=5, progress=True,
                               n_components=2)
    expected = aligner.embed("image", data.images)
    torch.testing.assert_close(bank.embeddings["image"], expected)
    torch.testing.assert_close(bank.embeddings["text"], aligner.embed("text", data.texts))
    torch.testing.assert_close(bank.embeddings["image"].norm(dim=1), torch.ones(18))


def test_build_tuple_dataset_with_field_positions():
    data = TupleDataset(10)
    aligner = _tiny_contrastive()
    bank = EmbeddingBank.build(data, aligner, student="image", teachers="text", fields={"image": 0, "text": 1},
                               progress=False, fit_gmm=False)
    torch.testing.assert_close(bank.embeddings["text"], aligner.embed("text", data.texts))


def test_sharded_build_and_concatenate_equal_full_build():
    data = PairedDataset(21)
    aligner = _tiny_contrastive()
    full = EmbeddingBank.build(data, aligner, student="image", teachers="text", progress=False, n_components=2)
    shards = [EmbeddingBank.build(data, aligner, student="image", teachers="text", progress=False,
                                  indices=range(rank, 21, 3), fit_gmm=False) for rank in range(3)]
    assert shards[1].indices.tolist() == list(range(1, 21, 3))
    joined = EmbeddingBank.concatenate(shards[::-1], n_components=2)
    assert joined.indices is None
    torch.testing.assert_close(joined.embeddings["image"], full.embeddings["image"])
    torch.testing.assert_close(joined.responsibilities, full.responsibilities)


def test_concatenate_refuses_overlapping_shards():
    z = latents(4)
    a = EmbeddingBank(z, student="image", teachers="text", indices=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValidationError, match="banks: expected disjoint shards, got dataset index 0"):
        EmbeddingBank.concatenate([a, a], fit_gmm=False)


def test_build_errors():
    data = PairedDataset(6)
    aligner = _tiny_contrastive()
    with pytest.raises(ValidationError, match="aligner: expected an aligner that knows modality 'audio'"):
        EmbeddingBank.build(data, aligner, student="audio", teachers="text", progress=False)
    with pytest.raises(ValidationError, match=r"indices: expected dataset indices in \[0, 6\), got 9"):
        EmbeddingBank.build(data, aligner, student="image", teachers="text", indices=[0, 9], progress=False)
    with pytest.raises(KeyError, match="field 'image' of sample 0"):
        EmbeddingBank.build([{"img": torch.zeros(3, 4, 4), "text": torch.zeros(6)}], aligner, student="image",
                            teachers="text", progress=False, fit_gmm=False)


# -- devices --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_to_device(device):
    bank = make_bank(10).to(device)
    assert bank.device.type == device
    assert bank.rows([1, 2]).embeddings["image"].device.type == device
    plan = bank.plan([0, 1, 2], p=1.0)
    assert plan.device.type == device


@needs_cuda
@pytest.mark.needs_cuda
def test_share_memory_refuses_cuda_bank():
    with pytest.raises(DeviceError, match="CMDAugment"):
        make_bank(6).to("cuda").share_memory_()


def test_bank_pickles():
    bank = make_bank(8)
    again = pickle.loads(pickle.dumps(bank))
    _tensors_equal(bank, again)
    assert NUM_CLASSES == 5
