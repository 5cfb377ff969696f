"""Uninformative-teacher controls (cmda_data.controls): the teacher's information is gone,
everything else is kept, the input is untouched."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from cmda_data import CMDACollate, CMDAError, CMDAugment, EmbeddingBank, IndexedDataset
from cmda_data.controls import (
    RandomTeacherAligner,
    ShuffledTeacherAligner,
    derangement,
    random_teacher,
    row_keys,
    shuffled_teacher,
)

CLASSES, PER_CLASS, DIM = 4, 12, 8


def clustered_bank(*, fit_on: str = "teacher", seed: int = 0) -> tuple:
    """Student and teacher latents that both point at their class direction (an informative teacher)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    centres = torch.eye(DIM)[:CLASSES] * 3
    student = torch.nn.functional.normalize(centres[labels] + 0.3 * torch.randn(len(labels), DIM, generator=g), dim=1)
    teacher = torch.nn.functional.normalize(centres[labels] + 0.3 * torch.randn(len(labels), DIM, generator=g), dim=1)
    bank = EmbeddingBank.from_embeddings({"image": student, "text": teacher}, student="image", teachers="text",
                                         fit_on=fit_on, n_components=2, covariance_type="diag")
    return bank, labels


def snapshot(bank: EmbeddingBank) -> dict:
    return {k: v.clone() for k, v in bank._tensors().items()}


def same_class_mass(bank: EmbeddingBank, labels: torch.Tensor) -> float:
    """Share of the plan weight on partners of the guiding row's own class (the whole bank as one batch)."""
    rows = torch.arange(len(bank))
    plan = bank.plan(rows, intra=None, p=1.0, similarity="cosine", temperature=0.05)
    same = (labels[plan.index] == labels[rows][:, None]).float()
    return float((plan.weights * same).sum(1).mean())


# ------------------------------------------------------------------------------------ banks
def test_random_teacher_replaces_only_the_teacher_and_leaves_the_input_alone():
    bank, _ = clustered_bank()
    before = snapshot(bank)
    control = random_teacher(bank, seed=3)
    assert all(torch.equal(before[k], v) for k, v in bank._tensors().items())  # input untouched
    assert control is not bank and bank.metadata.get("control") is None
    assert torch.equal(control.embedding("image"), bank.embedding("image"))
    z = control.embedding("text")
    assert z.shape == bank.embedding("text").shape and z.dtype == torch.float32
    assert torch.allclose(z.norm(dim=1), torch.ones(len(z)), atol=1e-6)
    assert control.metadata["control"] == {"kind": "random_teacher", "seed": 3, "teachers": ["text"],
                                           "gmm": "refitted"}


def test_random_teacher_depends_on_the_seed_only_not_on_the_teacher():
    bank_a, _ = clustered_bank(seed=0)
    bank_b, _ = clustered_bank(seed=1)  # other teacher latents, same shape
    a, b = random_teacher(bank_a, seed=5), random_teacher(bank_b, seed=5)
    assert torch.equal(a.embedding("text"), b.embedding("text"))  # nothing of the teacher survives
    assert not torch.equal(a.embedding("text"), random_teacher(bank_a, seed=6).embedding("text"))


def test_random_teacher_refits_a_teacher_gmm_with_the_same_settings():
    bank, _ = clustered_bank()
    control = random_teacher(bank, seed=0)
    assert control.gmm is not bank.gmm
    assert control.n_components == bank.n_components
    assert control.gmm.covariance_type == bank.gmm.covariance_type and control.gmm.reg_covar == bank.gmm.reg_covar
    expected = control.gmm.predict_proba(control.embedding("text")).float()
    assert torch.allclose(control.responsibilities, expected, atol=1e-6)


def test_a_gmm_fitted_on_the_student_is_kept():
    bank, _ = clustered_bank(fit_on="student")
    for control in (random_teacher(bank), shuffled_teacher(bank)):
        assert control.gmm is bank.gmm
        assert torch.equal(control.responsibilities, bank.responsibilities)


def test_shuffled_teacher_is_a_derangement_of_the_real_rows_with_their_responsibilities():
    bank, _ = clustered_bank()
    before = snapshot(bank)
    control = shuffled_teacher(bank, seed=2)
    assert all(torch.equal(before[k], v) for k, v in bank._tensors().items())
    old, new = bank.embedding("text"), control.embedding("text")
    # each new row is some old row (real captions), never its own (wrong pairing)
    source = torch.cdist(new, old).argmin(1)
    assert torch.equal(new, old[source])
    assert sorted(source.tolist()) == list(range(len(bank)))
    assert bool((source != torch.arange(len(bank))).all())
    assert torch.equal(control.responsibilities, bank.responsibilities[source])
    assert control.gmm is bank.gmm and torch.equal(control.embedding("image"), bank.embedding("image"))


def test_the_controls_remove_the_teachers_information():
    """The real teacher puts most weight on the own class; both controls fall to about chance."""
    bank, labels = clustered_bank()
    real = same_class_mass(bank, labels)
    assert real > 0.9
    for control in (random_teacher(bank, seed=0), shuffled_teacher(bank, seed=0)):
        assert same_class_mass(control, labels) < 0.5  # chance is 1 / CLASSES = 0.25


def test_several_teachers_and_a_chosen_one():
    g = torch.Generator().manual_seed(0)
    z = {m: torch.nn.functional.normalize(torch.randn(10, 4, generator=g), dim=1) for m in ("x", "t1", "t2")}
    bank = EmbeddingBank(z, student="x", teachers=["t1", "t2"])
    both = shuffled_teacher(bank, seed=1)
    assert not torch.equal(both.embedding("t1"), z["t1"]) and not torch.equal(both.embedding("t2"), z["t2"])
    only = random_teacher(bank, seed=1, teachers="t2")
    assert torch.equal(only.embedding("t1"), z["t1"]) and not torch.equal(only.embedding("t2"), z["t2"])
    assert only.metadata["control"]["teachers"] == ["t2"]


def test_a_control_bank_feeds_the_collate_in_worker_processes():
    bank, labels = clustered_bank()
    data = [{"image": torch.randn(3), "label": int(y)} for y in labels]
    collate = CMDACollate(random_teacher(bank, seed=0), target="label", num_classes=CLASSES, p=1.0, seed=0)
    loader = DataLoader(IndexedDataset(data), batch_size=16, collate_fn=collate, num_workers=2)
    batches = list(loader)
    assert sum(len(b["image"]) for b in batches) == len(data)
    assert all(torch.allclose(b["label"].sum(1), torch.ones(len(b["label"]))) for b in batches)


@pytest.mark.parametrize("call, name", [
    (lambda bank: random_teacher(bank, teachers="image"), "teachers"),
    (lambda bank: shuffled_teacher(bank, teachers=[]), "teachers"),
    (lambda bank: random_teacher(bank, seed=1.5), "seed"),
    (lambda bank: random_teacher(object()), "source"),
    (lambda bank: shuffled_teacher(EmbeddingBank({"x": torch.eye(1), "y": torch.eye(1)}, student="x",
                                                 teachers="y")), "bank"),
])
def test_bad_arguments_name_the_argument(call, name):
    bank, _ = clustered_bank()
    with pytest.raises(CMDAError, match=rf"^{name}: expected"):
        call(bank)


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 10, 257):
        perm = derangement(n, seed=n)
        assert sorted(perm.tolist()) == list(range(n)) and bool((perm != torch.arange(n)).all())


# ------------------------------------------------------------------------------------ aligners
class Normalise:
    """A stand-in aligner: the latent of a row is the row itself, normalised."""

    dim = DIM

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def embed(self, modality, batch):
        return torch.nn.functional.normalize(self.scale * batch.float(), dim=1)


def test_random_teacher_aligner_is_fixed_per_sample_and_ignores_the_aligner():
    x = torch.randn(6, DIM, generator=torch.Generator().manual_seed(0))
    wrapped = random_teacher(Normalise(), teachers="text", seed=1)
    assert isinstance(wrapped, RandomTeacherAligner) and wrapped.dim == DIM
    assert torch.equal(wrapped.embed("image", x), Normalise().embed("image", x))  # the student is untouched
    z = wrapped.embed("text", x)
    assert torch.allclose(z.norm(dim=1), torch.ones(6), atol=1e-6)
    assert torch.equal(wrapped.embed("text", x[2:5]), z[2:5])  # the same sample, the same latent, any batch
    other = random_teacher(Normalise(scale=-1.0), teachers="text", seed=1)  # another aligner
    assert torch.equal(other.embed("text", x), z)


def test_shuffled_teacher_aligner_permutes_the_batch_rows():
    x = torch.randn(7, DIM, generator=torch.Generator().manual_seed(0))
    wrapped = shuffled_teacher(Normalise(), teachers="text", seed=0)
    assert isinstance(wrapped, ShuffledTeacherAligner)
    real, z = Normalise().embed("text", x), wrapped.embed("text", x)
    source = torch.cdist(z, real).argmin(1)
    assert torch.equal(z, real[source]) and bool((source != torch.arange(7)).all())
    assert torch.equal(wrapped.embed("text", x), z)  # the same batch, the same permutation


def test_wrapped_aligner_drives_cmdaugment():
    x = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0))
    aug = CMDAugment(aligner=random_teacher(Normalise(), teachers="text", seed=0), student="image", teachers="text",
                     p=1.0, intra=None)
    out, plan = aug({"image": x, "text": x})
    expected = (plan.weights[..., None] * x[plan.index]).sum(1)  # a convex combination of the batch
    assert torch.allclose(out["image"], expected, atol=1e-5)
    assert torch.allclose(plan.weights.sum(1), torch.ones(8), atol=1e-5) and bool((plan.weights >= 0).all())


def test_aligner_controls_need_the_teacher_names():
    with pytest.raises(CMDAError, match="^teachers: expected"):
        random_teacher(Normalise())


def test_row_keys_of_tensors_strings_and_token_dicts():
    t = torch.arange(12.0).reshape(3, 4)
    assert row_keys(t, 3) == row_keys(t.clone(), 3) and len(set(row_keys(t, 3))) == 3
    assert row_keys(t[1:], 2) == row_keys(t, 3)[1:]
    assert row_keys(["a", "b"], 2)[1] == row_keys(["b"], 1)[0]
    tokens = {"input_ids": torch.tensor([[1, 2], [1, 3]]), "attention_mask": torch.ones(2, 2, dtype=torch.long)}
    keys = row_keys(tokens, 2)
    assert keys[0] != keys[1] and keys == row_keys(dict(reversed(list(tokens.items()))), 2)
    with pytest.raises(CMDAError, match="^batch: expected 4 samples"):
        row_keys(t, 4)
