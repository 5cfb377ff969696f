"""CMDAugment: CMDA as an nn.Module after the loader (bank lookup and online aligner modes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _entry_data import NUM_CLASSES, PairedDataset, latents, make_bank
from _host_reads import HostReads
from conftest import CPU_AND_CUDA
from torch import nn
from torch.utils.data import default_collate

from cmda_data.aligners import ContrastiveAligner, PrecomputedAligner
from cmda_data.augment.collate import CMDACollate
from cmda_data.augment.dataset import IndexedDataset
from cmda_data.augment.module import CMDAugment
from cmda_data.core.mixture import GaussianMixture
from cmda_data.exceptions import FieldError, NotFittedError, ValidationError

N = 16


@pytest.fixture(scope="module")
def data():
    return PairedDataset(N)


@pytest.fixture(scope="module")
def bank():
    return make_bank(N)


def full_batch(data, n=N):
    return default_collate([IndexedDataset(data)[i] for i in range(n)])


def clone_batch(batch):
    return {k: v.clone() if isinstance(v, torch.Tensor) else list(v) for k, v in batch.items()}


def assert_same_inputs(a, b):
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key])


def tiny_aligner():
    return ContrastiveAligner({"image": nn.Flatten(), "text": nn.Identity()}, dim=4, head_hidden=(),
                              in_features={"image": 48, "text": 6}, seed=0)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_lookup_mode_equals_the_collate(data, bank, device):
    kwargs = dict(target="label", num_classes=NUM_CLASSES, p=0.6, top_k=4, seed=7)
    batch = full_batch(data)
    expected = CMDACollate(bank, **kwargs)([IndexedDataset(data)[i] for i in range(N)])
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out, plan = CMDAugment(bank=bank.to(device), **kwargs)(on_device)
    assert out["image"].device.type == device and plan.device.type == device
    torch.testing.assert_close(out["image"].cpu(), expected["image"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["label"].cpu(), expected["label"], atol=1e-5, rtol=1e-5)
    for key in ("partners", "mixed", "teacher", "index"):
        assert torch.equal(out["mix_info"][key].cpu(), expected["mix_info"][key])


def test_online_mode_with_the_bank_aligner_equals_the_collate(data, bank):
    """Embedding the batch with the aligner the bank was built from gives the bank's weights."""
    z = latents(N)
    aligner = PrecomputedAligner({"image": z["image"], "text": z["text"]})
    kwargs = dict(target="label", num_classes=NUM_CLASSES, p=0.8, seed=1)
    out, plan = CMDAugment(aligner=aligner, gmm=bank.gmm, student="image", teachers="text", **kwargs)(full_batch(data))
    expected = CMDACollate(bank, **kwargs)([IndexedDataset(data)[i] for i in range(N)])
    torch.testing.assert_close(out["image"], expected["image"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["mix_info"]["weights"], expected["mix_info"]["weights"], atol=1e-5, rtol=1e-5)
    assert torch.equal(out["mix_info"]["mixed"], expected["mix_info"]["mixed"])


def test_online_mode_embeds_the_fields_without_gradient_to_the_weights(data):
    aligner = tiny_aligner()
    module = CMDAugment(aligner=aligner, student="image", teachers="text", target="label", num_classes=NUM_CLASSES, p=1.0,
                        top_k=3)
    batch = full_batch(data)
    batch["image"] = batch["image"].clone().requires_grad_(True)
    before = clone_batch({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    out, plan = module(batch)
    assert not plan.weights.requires_grad
    assert out["image"].requires_grad  # gradients reach the student samples, not the weights
    out["image"].sum().backward()
    assert batch["image"].grad is not None
    assert_same_inputs(before, {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    # the weights are Eq. 10 x Eq. 11 of the aligner's latents, recomputed with a slow loop
    z_img, z_txt = aligner.embed("image", batch["image"].detach()), aligner.embed("text", batch["text"])
    resp = module.gmm.predict_proba(z_txt).float()
    c = resp.argmax(1)
    expected_dense = torch.zeros(N, N)
    for r in range(N):
        scores = [abs(float(z_txt[r] @ z_img[j])) for j in range(N)]
        row = [scores[j] / sum(scores) * float(resp[r, c[j]] + resp[r, c[r]]) for j in range(N)]
        keep = sorted(range(N), key=lambda j: -row[j])[:3]
        for j in keep:
            expected_dense[r, j] = row[j] / sum(row[t] for t in keep)
    torch.testing.assert_close(plan.dense(N), expected_dense, atol=1e-5, rtol=1e-4)
    for r in range(N):
        expected = sum(w * batch["image"][j].detach() for j, w in zip(plan.index[r].tolist(), plan.weights[r].tolist()))
        torch.testing.assert_close(out["image"][r].detach(), expected)
    assert "text" not in dict(module.named_modules())  # the aligner is not a submodule
    assert not list(module.parameters())


def test_inputs_are_not_modified_in_place(data, bank):
    batch = full_batch(data)
    before = clone_batch(batch)
    out, _ = CMDAugment(bank=bank, target="label", num_classes=NUM_CLASSES, p=1.0)(batch)
    assert_same_inputs(before, batch)
    assert out is not batch and out["image"] is not batch["image"]


def test_refit_every(data):
    module = CMDAugment(aligner=tiny_aligner(), student="image", teachers="text", p=1.0, refit_every=2)
    batch = full_batch(data)
    fitted = []
    for _ in range(4):
        module(batch)
        fitted.append(module.gmm)
    assert isinstance(fitted[0], GaussianMixture) and fitted[0].covariance_type == "diag"
    assert fitted[0] is fitted[1] and fitted[1] is not fitted[2] and fitted[2] is fitted[3]
    once = CMDAugment(aligner=tiny_aligner(), student="image", teachers="text", p=1.0)
    once(batch)
    first = once.gmm
    once(batch)
    assert once.gmm is first


def test_batch_of_one_and_without_index(data):
    module = CMDAugment(aligner=tiny_aligner(), student="image", teachers="text", p=1.0, n_components=2)
    batch = full_batch(data, 1)
    del batch["index"]
    out, plan = module(batch)
    assert torch.equal(out["image"], batch["image"]) and not plan.mixed.any()
    assert out["mix_info"]["partners"].tolist() == [[0]]


def test_without_index_draws_depend_on_the_call_number(data):
    batch = full_batch(data)
    del batch["index"]
    make = lambda: CMDAugment(aligner=tiny_aligner(), student="image", teachers="text", p=0.5, intra=None, seed=3)  # noqa: E731
    a, b = make(), make()
    first_a, first_b = a(batch)[1], b(batch)[1]
    assert torch.equal(first_a.mixed, first_b.mixed)
    second_a = a(batch)[1]
    assert not torch.equal(first_a.mixed, second_a.mixed) or not torch.equal(first_a.index, second_a.index)


def test_set_epoch_changes_lookup_draws(data, bank):
    module = CMDAugment(bank=bank, p=0.5)
    batch = full_batch(data)
    first = module(batch)[1].mixed
    assert torch.equal(first, module(batch)[1].mixed)  # indexed rows: same epoch, same draws
    module.set_epoch(1)
    assert not torch.equal(first, module(batch)[1].mixed)


def test_soft_targets(data, bank):
    out, plan = CMDAugment(bank=bank, target="label", num_classes=NUM_CLASSES, p=1.0, label_smoothing=0.2)(
        full_batch(data))
    torch.testing.assert_close(out["label"].sum(1), torch.ones(N))
    labels = torch.tensor([data[i]["label"] for i in range(N)])
    onehot = F.one_hot(labels, NUM_CLASSES).float() * 0.8 + 0.2 / NUM_CLASSES
    torch.testing.assert_close(out["label"], plan.dense(N) @ onehot)


def test_errors(data, bank):
    with pytest.raises(ValidationError, match="aligner: expected an aligner .* or bank=EmbeddingBank"):
        CMDAugment()
    with pytest.raises(ValidationError, match="gmm: expected None in lookup mode"):
        CMDAugment(bank=bank, gmm=bank.gmm)
    with pytest.raises(ValidationError, match="student: expected the student modality name"):
        CMDAugment(aligner=tiny_aligner(), teachers="text")
    batch = full_batch(data)
    del batch["index"]
    with pytest.raises(FieldError, match="field 'index' of sample batch"):
        CMDAugment(bank=bank)(batch)
    tokens = full_batch(data)
    tokens["image"] = torch.zeros(N, 3, dtype=torch.long)
    with pytest.raises(FieldError, match="field 'image' of the batch: .*mix embeddings instead"):
        CMDAugment(bank=bank)(tokens)
    nan = full_batch(data)
    nan["image"] = nan["image"].clone()
    nan["image"][4, 0, 0, 0] = float("nan")
    with pytest.raises(ValidationError, match=rf"field 'image' of sample {int(nan['index'][4])}: expected finite "
                                              r"values \(no NaN or inf\), got 1 non-finite entries"):
        CMDAugment(bank=bank, p=1.0)(nan)


def test_set_p(data, bank):
    batch = full_batch(data)
    module = CMDAugment(bank=bank, target="label", num_classes=NUM_CLASSES, p=0.5, seed=3)
    module.set_p(0.0)
    out, plan = module(batch)
    assert module.p == 0.0 and not bool(plan.mixed.any()) and torch.equal(out["image"], batch["image"])
    module.set_p(1.0)
    assert bool(module(batch)[1].mixed.all()) and "p=1.0" in repr(module)
    module.set_p(0.5)  # set back: the same draws as p given to the constructor
    expected, _ = CMDAugment(bank=bank, target="label", num_classes=NUM_CLASSES, p=0.5, seed=3)(batch)
    assert torch.equal(module(batch)[0]["image"], expected["image"])
    with pytest.raises(ValidationError, match="p: expected"):
        module.set_p(-1)


def test_keep_real_equals_the_collate(data, bank):
    kwargs = dict(target="label", num_classes=NUM_CLASSES, p=0.6, top_k=4, seed=7, keep_real=True)
    batch = full_batch(data)
    before = clone_batch(batch)
    expected = CMDACollate(bank, **kwargs)([IndexedDataset(data)[i] for i in range(N)])
    out, plan = CMDAugment(bank=bank, **kwargs)(batch)
    assert_same_inputs(batch, before)
    g = int(plan.mixed.sum())
    assert out["image"].shape[0] == N + g and plan.num_outputs == N
    assert torch.equal(out["image"][:N], batch["image"])
    torch.testing.assert_close(out["image"], expected["image"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["label"], expected["label"], atol=1e-5, rtol=1e-5)
    assert out["caption"] == expected["caption"]
    for key in expected["mix_info"]:
        assert torch.equal(out["mix_info"][key], expected["mix_info"][key])


def test_keep_real_keeps_gradients_of_both_parts(data):
    module = CMDAugment(aligner=tiny_aligner(), student="image", teachers="text", intra=None, p=1.0, keep_real=True)
    batch = full_batch(data, 6)
    image = batch["image"].clone().requires_grad_(True)
    out, _ = module(dict(batch, image=image))
    assert out["image"].shape[0] == 12
    out["image"][:6].sum().backward()
    assert torch.equal(image.grad, torch.ones_like(image))


def test_set_gmm(data):
    z = latents(N)
    aligner = PrecomputedAligner({"image": z["image"], "text": z["text"]})
    module = CMDAugment(aligner=aligner, student="image", teachers="text", p=1.0)
    batch = full_batch(data)
    for epoch in range(2):  # refit on all training latents at each epoch start
        gmm = GaussianMixture(2, covariance_type="diag", random_state=epoch)
        gmm.fit(aligner.embed("text", torch.arange(N)))
        module.set_epoch(epoch)
        module.set_gmm(gmm)
        out, plan = module(batch)
        assert module.gmm is gmm  # used as is, not refitted
        resp = gmm.predict_proba(aligner.embed("text", torch.arange(N))).float()  # Eq. 11 by hand
        torch.testing.assert_close(plan.intra, resp @ F.one_hot(resp.argmax(1), 2).float().T
                                   + resp.gather(1, resp.argmax(1, keepdim=True)), atol=1e-6, rtol=1e-6)
    module.set_gmm(None)
    assert module.gmm is None
    with pytest.raises(ValidationError, match="gmm: expected a fitted cmda_data.GaussianMixture"):
        module.set_gmm("gmm")
    with pytest.raises(NotFittedError, match="GaussianMixture: expected a fitted model"):
        module.set_gmm(GaussianMixture(2))
    wrong = GaussianMixture(2, covariance_type="diag", random_state=0).fit(torch.randn(20, 3))
    with pytest.raises(ValidationError, match="gmm: expected a GaussianMixture fitted on"):
        module.set_gmm(wrong)


def test_set_gmm_refused_in_lookup_mode(data, bank):
    with pytest.raises(ValidationError, match="gmm: expected None in lookup mode"):
        CMDAugment(bank=bank).set_gmm(bank.gmm)


@pytest.mark.parametrize("mode", ["aligner", "lookup"])
def test_a_batch_needs_few_host_reads(data, bank, mode):
    """Checks are read back together and the library's own plans are not re-checked (it was
    59 reads per batch in aligner mode before; CPU-only shortcuts account for a few of these, one of them
    the top-k of the mixed rows only)."""
    kwargs = dict(target="label", num_classes=NUM_CLASSES, p=0.8, seed=1)
    if mode == "aligner":
        z = latents(N)
        module = CMDAugment(aligner=PrecomputedAligner({"image": z["image"], "text": z["text"]}), gmm=bank.gmm,
                            student="image", teachers="text", **kwargs)
    else:
        module = CMDAugment(bank=bank, **kwargs)
    batch = full_batch(data)
    expected, _ = module(batch)  # warm (first-call work) and the reference output
    with HostReads() as reads:
        out, _ = module(batch)
    assert reads.count <= 13, reads.count
    torch.testing.assert_close(out["image"], expected["image"], rtol=0, atol=0)


class _BadGMM:
    """A user mixture whose posteriors are not distributions (rows sum to 2)."""

    n_components = 2

    def predict_proba(self, z):
        return torch.ones(z.shape[0], 2, device=z.device)


class _NaNTextAligner(PrecomputedAligner):
    """An aligner whose text latents went NaN (a diverged model)."""

    def embed(self, modality, batch):
        out = super().embed(modality, batch).clone()
        if modality == "text":
            out[3, 0] = float("nan")
        return out


def test_bad_latents_and_posteriors_are_named(data, bank):
    z = latents(N)
    kwargs = dict(student="image", teachers="text", target="label", num_classes=NUM_CLASSES, p=1.0, seed=1)
    module = CMDAugment(aligner=_NaNTextAligner({"image": z["image"], "text": z["text"]}), gmm=bank.gmm, intra=None,
                        **kwargs)
    with pytest.raises(ValidationError, match=r"teacher_z: expected finite values \(no NaN or inf\), got 1 non-finite"):
        module(full_batch(data))
    module = CMDAugment(aligner=PrecomputedAligner({"image": z["image"], "text": z["text"]}), gmm=_BadGMM(), **kwargs)
    with pytest.raises(ValidationError, match=r"resp_rows: expected responsibility rows that sum to 1"):
        module(full_batch(data))


def test_online_mode_with_a_bank_takes_its_roles_and_its_gmm(data, bank):
    """aligner + bank (for its GMM only): student and teachers default to the bank's, and the
    plan equals the one built with them given explicitly."""
    z = latents(N)
    aligner = PrecomputedAligner({"image": z["image"], "text": z["text"]})
    implicit = CMDAugment(bank, aligner=aligner, p=1.0, seed=2)
    explicit = CMDAugment(bank, aligner=aligner, student="image", teachers="text", p=1.0, seed=2)
    assert (implicit.student, implicit.teachers) == (bank.student, tuple(bank.teachers))
    batch = full_batch(data)
    a, b = implicit.plan(batch), explicit.plan(batch)
    assert torch.equal(a.index, b.index) and torch.equal(a.weights, b.weights) and bool(a.mixed.any())
