"""cmda_data.core.losses against slow, obviously-correct loop implementations (Eq. 7, 8, 9, SupCon)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_AND_CUDA

from cmda_data.core.losses import eq7_loss, eq8_loss, joint_loss, supcon_loss
from cmda_data.exceptions import ShapeError, ValidationError


# ---------------------------------------------------------------------------------------
# references: plain Python loops over i, p, q, l with math.exp
# ---------------------------------------------------------------------------------------
def _unit_rows(tensor):
    rows = tensor.double().tolist()
    out = []
    for row in rows:
        norm = math.sqrt(sum(v * v for v in row))
        out.append([v / norm for v in row])
    return out


def _sim(a, b):
    return sum(x * y for x, y in zip(a, b))


def _modalities(latents):
    values = latents.values() if isinstance(latents, dict) else latents
    return [_unit_rows(t) for t in values]


def ref_eq7(latents, tau):
    Z = _modalities(latents)
    K, m = len(Z), len(Z[0])
    out = []
    for i in range(m):
        num = 0.0
        den = 0.0
        for p in range(K):
            for q in range(K):
                if p == q:
                    continue
                num += math.exp(_sim(Z[p][i], Z[q][i]) / tau)
                for l in range(m):
                    if l != i:
                        den += math.exp(_sim(Z[p][i], Z[q][l]) / tau)
        out.append(-math.log(num / den))
    return out


def ref_eq8(latents, labels, tau, normalize_by="paper"):
    Z = _modalities(latents)
    K, m = len(Z), len(Z[0])
    y = list(labels)
    out = []
    for i in range(m):
        m_y = sum(1 for j in range(m) if y[j] == y[i])
        norm = m_y if normalize_by == "positives" else (m_y - 1 if m_y > 1 else 1)
        den = 0.0
        for p in range(K):
            for q in range(K):
                for l in range(m):
                    if p != q and l != i:
                        den += math.exp(_sim(Z[p][i], Z[q][l]) / tau)
        total = 0.0
        for j in range(m):
            if y[j] != y[i]:
                continue
            num = 0.0
            for p in range(K):
                for q in range(K):
                    if p != q:
                        num += math.exp(_sim(Z[p][i], Z[q][j]) / tau)
            total += math.log(num / den)
        out.append(-total / norm)
    return out


def ref_supcon(latents, labels, tau, base_temperature):
    Z = _modalities(latents)
    K, m = len(Z), len(Z[0])
    ids = list(range(m)) if labels is None else list(labels)
    anchors = [(p, i) for p in range(K) for i in range(m)]
    scale = 1.0 if base_temperature is None else tau / base_temperature
    per_anchor = {}
    for a in anchors:
        za = Z[a[0]][a[1]]
        den = sum(math.exp(_sim(za, Z[b[0]][b[1]]) / tau) for b in anchors if b != a)
        logs = [
            math.log(math.exp(_sim(za, Z[b[0]][b[1]]) / tau) / den)
            for b in anchors
            if b != a and ids[b[1]] == ids[a[1]]
        ]
        per_anchor[a] = -scale * sum(logs) / len(logs)
    return [sum(per_anchor[(p, i)] for p in range(K)) / K for i in range(m)]


def official_supcon(features, labels=None, temperature=0.5, base_temperature=0.07):
    """Transcription of SupContrast's SupConLoss.forward (contrast_mode='all') used by the CMDA code."""
    batch_size = features.shape[0]
    if labels is None:
        mask = torch.eye(batch_size, dtype=torch.float64)
    else:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).double()
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_feature = contrast_feature
    anchor_count = contrast_count
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


def _latents(K, m, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {f"mod{k}": torch.randn(m, d, generator=g, dtype=dtype) for k in range(K)}


CASES = [(2, 2, 3), (2, 5, 4), (3, 4, 3), (4, 3, 2)]


# ---------------------------------------------------------------------------------------
# Eq. 7
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("K,m,d", CASES)
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_eq7_matches_loop(K, m, d, tau):
    latents = _latents(K, m, d, seed=K * 10 + m)
    expected = torch.tensor(ref_eq7(latents, tau), dtype=torch.float64)
    got = eq7_loss(latents, tau=tau, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eq7_loss(latents, tau=tau), expected.mean())
    torch.testing.assert_close(eq7_loss(latents, tau=tau, reduction="sum"), expected.sum())


def test_eq7_hand_computed_two_samples():
    # image e1, e2; text rows at cos 0.995 with their pair and 0.0995 with the other
    z_img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z_txt = torch.tensor([[1.0, 0.1], [0.1, 1.0]], dtype=torch.float64)
    c_pos, c_neg = 1.0 / math.sqrt(1.01), 0.1 / math.sqrt(1.01)
    expected = -(c_pos - c_neg) / 0.5  # -log(2 e^{c+/tau} / 2 e^{c-/tau})
    got = eq7_loss({"image": z_img, "text": z_txt}, tau=0.5, reduction="none")
    torch.testing.assert_close(got, torch.full((2,), expected, dtype=torch.float64))


def test_eq7_dict_and_list_agree_and_scale_invariant():
    latents = _latents(3, 6, 5, seed=3)
    as_list = list(latents.values())
    scaled = [t * 7.5 for t in as_list]
    torch.testing.assert_close(eq7_loss(latents), eq7_loss(as_list))
    torch.testing.assert_close(eq7_loss(latents), eq7_loss(scaled))


def test_eq7_small_tau_is_stable_float32():
    latents = _latents(2, 6, 8, seed=5, dtype=torch.float32)
    tau = 0.005  # exp(1/tau) = exp(200) overflows float32 if summed naively
    got = eq7_loss(latents, tau=tau, reduction="none")
    assert torch.isfinite(got).all()
    expected = torch.tensor(ref_eq7(latents, tau), dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-2)


# ---------------------------------------------------------------------------------------
# Eq. 8
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("K,m,d", CASES)
@pytest.mark.parametrize("normalize_by", ["paper", "positives"])
def test_eq8_matches_loop(K, m, d, normalize_by):
    latents = _latents(K, m, d, seed=K + m)
    labels = torch.tensor([0, 1, 0, 2, 1][:m])
    expected = torch.tensor(ref_eq8(latents, labels.tolist(), 0.3, normalize_by), dtype=torch.float64)
    got = eq8_loss(latents, labels, tau=0.3, reduction="none", normalize_by=normalize_by)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eq8_loss(latents, labels, tau=0.3, reduction="sum", normalize_by=normalize_by),
                               expected.sum())


def test_eq8_singleton_class_gets_its_eq7_term():
    latents = _latents(2, 5, 3, seed=9)
    labels = torch.tensor([0, 0, 1, 2, 2])  # sample 2 is alone in its class
    eq8 = eq8_loss(latents, labels, reduction="none")
    eq7 = eq7_loss(latents, reduction="none")
    assert torch.isfinite(eq8).all()
    torch.testing.assert_close(eq8[2], eq7[2])


def test_eq8_with_distinct_labels_and_mean_over_positives_is_eq7():
    latents = _latents(3, 6, 4, seed=11)
    labels = torch.arange(6)
    torch.testing.assert_close(eq8_loss(latents, labels, normalize_by="positives"), eq7_loss(latents))
    torch.testing.assert_close(eq8_loss(latents, labels, normalize_by="paper"), eq7_loss(latents))


def test_eq8_accepts_list_labels_and_numpy():
    np = pytest.importorskip("numpy")
    latents = _latents(2, 4, 3)
    base = eq8_loss(latents, torch.tensor([1, 1, 0, 0]))
    torch.testing.assert_close(eq8_loss(latents, [1, 1, 0, 0]), base)
    torch.testing.assert_close(eq8_loss(latents, np.array([1, 1, 0, 0])), base)


# ---------------------------------------------------------------------------------------
# SupCon (official code parity)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("K,m,d", CASES)
@pytest.mark.parametrize("with_labels", [False, True])
def test_supcon_matches_loop_and_official_code(K, m, d, with_labels):
    latents = _latents(K, m, d, seed=7 * K + m)
    labels = torch.tensor([1, 0, 1, 2, 0][:m]) if with_labels else None
    expected = torch.tensor(ref_supcon(latents, None if labels is None else labels.tolist(), 0.5, 0.07),
                            dtype=torch.float64)
    got = supcon_loss(latents, labels, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    features = torch.stack([F.normalize(t, dim=1) for t in latents.values()], dim=1)  # [m, K, d]
    official = official_supcon(features, labels)
    torch.testing.assert_close(supcon_loss(latents, labels), official)


def test_supcon_without_base_temperature_scale():
    latents = _latents(2, 4, 3, seed=2)
    scaled = supcon_loss(latents, tau=0.5, base_temperature=0.07)
    plain = supcon_loss(latents, tau=0.5, base_temperature=None)
    torch.testing.assert_close(scaled, plain * (0.5 / 0.07))
    expected = torch.tensor(ref_supcon(latents, None, 0.5, None), dtype=torch.float64)
    torch.testing.assert_close(supcon_loss(latents, base_temperature=None, reduction="none"), expected)


# ---------------------------------------------------------------------------------------
# shared invariants
# ---------------------------------------------------------------------------------------
LOSSES = {
    "eq7": lambda z: eq7_loss(z),
    "eq8": lambda z: eq8_loss(z, torch.tensor([0, 0, 1, 1, 2], device=next(iter(z.values())).device)),
    "supcon": lambda z: supcon_loss(z),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_gradient_finite_and_inputs_untouched(name, device):
    latents = {k: v.float().to(device).requires_grad_() for k, v in _latents(2, 5, 4, seed=1).items()}
    latents["mod0"].data[1] = 0.0  # a zero row (normalises to zero, never NaN)
    latents["mod1"].data[3] = latents["mod1"].data[2]  # duplicate rows
    before = {k: v.detach().clone() for k, v in latents.items()}
    loss = LOSSES[name](latents)
    assert loss.device.type == device and loss.dtype == torch.float32 and loss.ndim == 0
    loss.backward()
    for key, value in latents.items():
        assert torch.isfinite(value.grad).all()
        assert value.grad.abs().sum() > 0
        torch.testing.assert_close(value.detach(), before[key])


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_kept(name, dtype):
    latents = {k: v.to(dtype) for k, v in _latents(2, 5, 4, seed=4).items()}
    loss = LOSSES[name](latents)
    assert loss.dtype == dtype and torch.isfinite(loss)
    reference = LOSSES[name]({k: v.double() for k, v in latents.items()})
    torch.testing.assert_close(loss.double(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_perfectly_aligned_batch_has_lower_loss_than_a_shuffled_one(name):
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(5, 8, generator=g, dtype=torch.float64)
    aligned = {"a": shared, "b": shared + 0.01 * torch.randn(5, 8, generator=g, dtype=torch.float64)}
    shuffled = {"a": shared, "b": aligned["b"][torch.tensor([1, 2, 3, 4, 0])]}
    assert LOSSES[name](aligned) < LOSSES[name](shuffled)


# ---------------------------------------------------------------------------------------
# errors a person can act on
# ---------------------------------------------------------------------------------------
def test_bad_latents_messages():
    z = torch.randn(4, 3)
    with pytest.raises(ValidationError, match=r"latents: expected at least 2 modalities, got 1 modality"):
        eq7_loss({"image": z})
    with pytest.raises(ValidationError, match=r"latents: expected a dict or list of \[m, d\] tensors"):
        eq7_loss(z)
    with pytest.raises(ShapeError, match=r"latents\['text'\]: expected shape \(4, 3\) like latents\['image'\], "
                                          r"got shape \(5, 3\)"):
        eq7_loss({"image": z, "text": torch.randn(5, 3)})
    with pytest.raises(ShapeError, match=r"latents\[1\]: expected a 2-D tensor"):
        supcon_loss([z, torch.randn(4)])
    with pytest.raises(ShapeError, match=r"latents: expected at least 2 samples per modality .* got 1 sample"):
        eq7_loss([z[:1], z[:1]])
    with pytest.raises(ValidationError, match=r"latents\[0\]: expected finite values .* got 1 non-finite"):
        eq7_loss([torch.tensor([[float("nan"), 0.0], [1.0, 1.0]]), torch.ones(2, 2)])
    with pytest.raises(ValidationError, match=r"latents\[0\]: expected a floating-point tensor"):
        eq7_loss([torch.ones(4, 3, dtype=torch.long), z])


def test_bad_options_messages():
    z = _latents(2, 4, 3)
    with pytest.raises(ValidationError, match=r"tau: expected a finite number > 0, got 0"):
        eq7_loss(z, tau=0)
    with pytest.raises(ValidationError, match=r"reduction: expected one of 'mean', 'sum', 'none', got 'avg'"):
        eq8_loss(z, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValidationError, match=r"normalize_by: expected one of 'paper', 'positives'"):
        eq8_loss(z, torch.zeros(4, dtype=torch.long), normalize_by="classes")
    with pytest.raises(ValidationError, match=r"base_temperature: expected a finite number > 0, got -1.0"):
        supcon_loss(z, base_temperature=-1.0)


def test_bad_labels_messages():
    z = _latents(2, 4, 3)
    with pytest.raises(ShapeError, match=r"labels: expected one label per sample \(4\), got 3 labels"):
        eq8_loss(z, torch.tensor([0, 1, 1]))
    with pytest.raises(ValidationError, match=r"labels: expected a 1-D integer tensor of class indices"):
        eq8_loss(z, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ShapeError, match=r"labels: expected a 1-D tensor"):
        supcon_loss(z, torch.zeros(4, 1, dtype=torch.long))


# ---------------------------------------------------------------------------------------
# Eq. 9
# ---------------------------------------------------------------------------------------
def test_joint_loss_is_task_plus_lambda_align():
    task = torch.tensor(1.25, requires_grad=True)
    align = torch.tensor(-3.0, requires_grad=True)
    out = joint_loss(task, align, lam=0.1)
    torch.testing.assert_close(out, torch.tensor(1.25 - 0.3))
    out.backward()
    assert task.grad.item() == 1.0 and abs(align.grad.item() - 0.1) < 1e-7
    torch.testing.assert_close(joint_loss(task, align, lam=0), task.detach())


def test_joint_loss_errors():
    with pytest.raises(ValidationError, match=r"lam: expected a finite number >= 0, got -0.1"):
        joint_loss(torch.tensor(1.0), torch.tensor(1.0), lam=-0.1)
    with pytest.raises(ShapeError, match=r"align_loss: expected a scalar loss tensor"):
        joint_loss(torch.tensor(1.0), torch.ones(3))
    with pytest.raises(ValidationError, match=r"task_loss: expected finite values"):
        joint_loss(torch.tensor(float("inf")), torch.tensor(1.0))
    with pytest.raises(ValidationError, match=r"task_loss: expected a floating-point torch.Tensor, got 1.0"):
        joint_loss(1.0, torch.tensor(1.0))
