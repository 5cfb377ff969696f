"""Tests of cmda_data.core.functional: Eq. 10 / Eq. 11 / Alg. 1 weights, mixing, soft labels.

References are independent of the code under test: numbers worked out by hand (written
below), the official code's literal expression in numpy, and slow Python loops.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import strategies as S
import torch
from conftest import CPU_AND_CUDA, needs_cuda
from hypothesis import given, settings
from hypothesis import strategies as st

from cmda_data import MixPlan
from cmda_data.core import functional as Fn
from cmda_data.exceptions import CMDAError, DeviceError, ShapeError, ValidationError

# ------------------------------------------------------------------------------------
# The hand-computed example. 2-D unit vectors, rows = teachers i, columns = students j.
#   t1 = (1, 0)     t2 = (0, 1)      t3 = (0.6, 0.8)
#   s1 = (1, 0)     s2 = (0.6, -0.8) s3 = (-0.8, 0.6)
# cos(t_i, s_j):
#   t1: ( 1.0,  0.6, -0.8)
#   t2: ( 0.0, -0.8,  0.6)
#   t3: ( 0.6, -0.28, 0.0)        (0.36 - 0.64 = -0.28, -0.48 + 0.48 = 0)
# ------------------------------------------------------------------------------------
TEACHER = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
STUDENT = torch.tensor([[1.0, 0.0], [0.6, -0.8], [-0.8, 0.6]])

# |cos| rows (1, .6, .8) / 2.4, (0, .8, .6) / 1.4, (.6, .28, 0) / .88
EQ10_ABS = [[5 / 12, 3 / 12, 4 / 12],
            [0.0, 4 / 7, 3 / 7],
            [15 / 22, 7 / 22, 0.0]]
# cos clamped at 0: rows (1, .6, 0) / 1.6, (0, 0, .6) / .6, (.6, 0, 0) / .6
EQ10_COS = [[0.625, 0.375, 0.0],
            [0.0, 0.0, 1.0],
            [1.0, 0.0, 0.0]]
# the code's C / C.sum(1): row sums s = (2.4, 1.4, 0.88) divide COLUMN j by s_j
LEGACY = [[1 / 2.4, 0.6 / 1.4, 0.8 / 0.88],
          [0.0, 0.8 / 1.4, 0.6 / 0.88],
          [0.6 / 2.4, 0.28 / 1.4, 0.0]]
# softmax(|cos| / 0.5) per row, e.g. row 1: e^2, e^1.2, e^1.6 = 7.389056, 3.320117, 4.953032
SOFTMAX_T05 = [[0.471776, 0.211983, 0.316241],
               [0.107838, 0.534126, 0.358036],
               [0.546900, 0.288376, 0.164723]]
# self_weight=1: rows (1, .6, .8)/2.4, (0, 1, .6)/1.6, (.6, .28, 1)/1.88
SELF_WEIGHT_1 = [[5 / 12, 3 / 12, 4 / 12],
                 [0.0, 0.625, 0.375],
                 [0.319149, 0.148936, 0.531915]]

# M = 2 responsibilities; c = argmax = (0, 1, 0)
GAMMA = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
# Eq. 11: w_ij = gamma_i(c(j)) + gamma_i(c(i))
#   i=1 (c=0, max .9): j in c0 -> .9 + .9 = 1.8, j in c1 -> .1 + .9 = 1.0
#   i=2 (c=1, max .7): j in c0 -> .3 + .7 = 1.0, j in c1 -> .7 + .7 = 1.4
#   i=3 (c=0, max .6): j in c0 -> .6 + .6 = 1.2, j in c1 -> .4 + .6 = 1.0
EQ11_SOFT = [[1.8, 1.0, 1.8],
             [1.0, 1.4, 1.0],
             [1.2, 1.0, 1.2]]
EQ11_HARD = [[1.0, 0.0, 1.0],
             [0.0, 1.0, 0.0],
             [1.0, 0.0, 1.0]]
# Alg. 1 line 12 (no renormalisation): EQ10_ABS * EQ11_SOFT
#   row 1: (5/12 * 1.8, 3/12 * 1.0, 4/12 * 1.8) = (0.75, 0.25, 0.6)          sum 1.6
#   row 2: (0, 4/7 * 1.4, 3/7 * 1.0)             = (0, 0.8, 0.428571)        sum 1.228571
#   row 3: (15/22 * 1.2, 7/22 * 1.0, 0)          = (0.818182, 0.318182, 0)   sum 1.136364
ALG1_RAW = [[0.75, 0.25, 0.6],
            [0.0, 0.8, 3 / 7],
            [18 / 22, 7 / 22, 0.0]]
# renormalised rows: (0.46875, 0.15625, 0.375), (0, 5.6/8.6, 3/8.6), (18/25, 7/25, 0)
DCA = [[0.46875, 0.15625, 0.375],
       [0.0, 0.651163, 0.348837],
       [0.72, 0.28, 0.0]]


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ====================================================================== hand-computed
class TestEq10HandComputed:
    def test_abs_cosine_rows(self):
        w = Fn.inter_modal_weights(TEACHER, STUDENT)
        torch.testing.assert_close(w, t(EQ10_ABS, torch.float32))
        torch.testing.assert_close(w.sum(1), torch.ones(3))

    def test_clamped_cosine(self):
        w = Fn.inter_modal_weights(TEACHER, STUDENT, similarity="cosine")
        torch.testing.assert_close(w, t(EQ10_COS, torch.float32))

    def test_legacy_broadcast_numbers(self):
        w = Fn.inter_modal_weights(TEACHER, STUDENT, normalize="legacy_broadcast")
        torch.testing.assert_close(w, t(LEGACY, torch.float32))
        # the rows the code mixes with do not sum to 1
        torch.testing.assert_close(w.sum(1), t([1 / 2.4 + 0.6 / 1.4 + 0.8 / 0.88,
                                                0.8 / 1.4 + 0.6 / 0.88, 0.25 + 0.2], torch.float32))

    def test_legacy_broadcast_matches_official_expression(self):
        rng = np.random.default_rng(0)
        teacher, student = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
        tn = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
        sn = student / np.linalg.norm(student, axis=1, keepdims=True)
        C = np.abs(tn @ sn.T)
        official = C / C.sum(1)  # literally `cor_matrix / torch.sum(cor_matrix, dim=1)`
        ours = Fn.inter_modal_weights(torch.from_numpy(teacher), torch.from_numpy(student),
                                      normalize="legacy_broadcast")
        np.testing.assert_allclose(ours.numpy(), official, rtol=1e-12)
        assert not np.allclose(official.sum(1), 1.0)

    def test_none_returns_raw_scores(self):
        w = Fn.inter_modal_weights(TEACHER, STUDENT, normalize="none")
        torch.testing.assert_close(w, t([[1, 0.6, 0.8], [0, 0.8, 0.6], [0.6, 0.28, 0]], torch.float32))

    def test_softmax_with_temperature(self):
        w = Fn.inter_modal_weights(TEACHER.double(), STUDENT.double(), temperature=0.5)
        torch.testing.assert_close(w, t(SOFTMAX_T05), atol=2e-6, rtol=0)

    def test_self_weight_sets_diagonal_before_normalising(self):
        w = Fn.inter_modal_weights(TEACHER, STUDENT, self_weight=1.0)
        torch.testing.assert_close(w, t(SELF_WEIGHT_1, torch.float32), atol=2e-6, rtol=0)

    def test_latent_scale_does_not_matter(self):
        w = Fn.inter_modal_weights(TEACHER * 7.0, STUDENT * 0.01)
        torch.testing.assert_close(w, t(EQ10_ABS, torch.float32))

    def test_all_zero_row_becomes_uniform(self):
        # t2 = (0, 1) has clamped cosines (0, 0, 0) against these students
        student = torch.tensor([[1.0, 0.0], [0.6, -0.8], [-0.8, -0.6]])
        w = Fn.inter_modal_weights(TEACHER, student, similarity="cosine")
        torch.testing.assert_close(w[1], torch.full((3,), 1 / 3))
        zero_teacher = torch.zeros(1, 2)
        torch.testing.assert_close(Fn.inter_modal_weights(zero_teacher, STUDENT), torch.full((1, 3), 1 / 3))


class TestEq11HandComputed:
    def test_soft(self):
        torch.testing.assert_close(Fn.intra_modal_weights(GAMMA), t(EQ11_SOFT, torch.float32))

    def test_hard(self):
        torch.testing.assert_close(Fn.intra_modal_weights(GAMMA, mode="hard"),
                                   t(EQ11_HARD, torch.float32))

    def test_partner_resp_gives_columns(self):
        partners = torch.tensor([[0.2, 0.8], [0.55, 0.45]])  # c = (1, 0)
        w = Fn.intra_modal_weights(GAMMA, partners)
        torch.testing.assert_close(w, t([[1.0, 1.8], [1.4, 1.0], [1.0, 1.2]], torch.float32))

    def test_two_components_give_values_in_1_2(self):
        w = Fn.intra_modal_weights(GAMMA)
        assert float(w.min()) >= 1.0 and float(w.max()) <= 2.0

    def test_one_component_is_constant_two(self):
        torch.testing.assert_close(Fn.intra_modal_weights(torch.ones(4, 1)), torch.full((4, 4), 2.0))


class TestAlgorithm1HandComputed:
    def test_renormalised_product(self):
        inter = Fn.inter_modal_weights(TEACHER, STUDENT)
        w = Fn.dca_weights(inter, Fn.intra_modal_weights(GAMMA))
        torch.testing.assert_close(w, t(DCA, torch.float32), atol=2e-6, rtol=0)

    def test_without_renormalisation_rows_sum_in_1_2(self):
        inter = Fn.inter_modal_weights(TEACHER, STUDENT)
        w = Fn.dca_weights(inter, Fn.intra_modal_weights(GAMMA), renormalize=False)
        torch.testing.assert_close(w, t(ALG1_RAW, torch.float32))
        torch.testing.assert_close(w.sum(1), t([1.6, 0.8 + 3 / 7, 25 / 22], torch.float32))
        assert bool(((w.sum(1) >= 1) & (w.sum(1) <= 2)).all())

    def test_hard_mask_and_top_k(self):
        inter = Fn.inter_modal_weights(TEACHER, STUDENT)
        w = Fn.dca_weights(inter, Fn.intra_modal_weights(GAMMA, mode="hard"))
        # row 1 keeps columns 1, 3: (5/12, 4/12) / (9/12); row 2 only column 2; row 3 only column 1
        torch.testing.assert_close(w, t([[5 / 9, 0, 4 / 9], [0, 1, 0], [1, 0, 0]], torch.float32))
        top1 = Fn.dca_weights(inter, Fn.intra_modal_weights(GAMMA), top_k=1)
        torch.testing.assert_close(top1, t([[1, 0, 0], [0, 1, 0], [1, 0, 0]], torch.float32))

    def test_exclude_self(self):
        inter = Fn.inter_modal_weights(TEACHER, STUDENT)
        w = Fn.dca_weights(inter, exclude_self=True)
        # row 1: (0, 3/12, 4/12) / (7/12); row 2: (0, 0, 3/7) -> (0, 0, 1);
        # row 3: its diagonal entry is already 0 -> unchanged (15/22, 7/22, 0)
        torch.testing.assert_close(w, t([[0, 3 / 7, 4 / 7], [0, 0, 1], [15 / 22, 7 / 22, 0]],
                                        torch.float32))

    def test_exclude_self_keeps_a_lonely_row_on_itself(self):
        inter = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
        w = Fn.dca_weights(inter, exclude_self=True)
        torch.testing.assert_close(w, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        w = Fn.dca_weights(torch.tensor([[1.0]]), exclude_self=True, renormalize=False)
        torch.testing.assert_close(w, torch.tensor([[1.0]]))

    def test_mix_the_hand_example(self):
        samples = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
        out = Fn.mix(t(DCA, torch.float32), samples)
        # row 1: .46875 (1, 0) + .15625 (0, 1) + .375 (2, 2) = (1.21875, 0.90625)
        torch.testing.assert_close(out[0], torch.tensor([1.21875, 0.90625]))
        torch.testing.assert_close(out[2], torch.tensor([0.72, 0.28]))

    def test_topk_sparse_hand(self):
        index, values = Fn.topk_sparse(t(ALG1_RAW, torch.float32), 2)
        assert index.tolist() == [[0, 2], [1, 2], [0, 1]]
        torch.testing.assert_close(values, t([[0.75 / 1.35, 0.6 / 1.35], [0.8 / (0.8 + 3 / 7),
                                              (3 / 7) / (0.8 + 3 / 7)], [18 / 25, 7 / 25]],
                                             torch.float32))

    def test_mix_targets_hand(self):
        w = torch.tensor([[0.5, 0.25, 0.25]])
        out = Fn.mix_targets(w, torch.tensor([0, 1, 1]), num_classes=2, label_smoothing=0.2)
        # one-hot smoothed: (0.9, 0.1) and (0.1, 0.9); .5 (.9, .1) + .5 (.1, .9) = (.5, .5)
        torch.testing.assert_close(out, torch.tensor([[0.5, 0.5]]))
        multi = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # -> (.5, .5, 0), (0, 0, 1)
        out = Fn.mix_targets(torch.tensor([[0.5, 0.5]]), multi)
        torch.testing.assert_close(out, torch.tensor([[0.25, 0.25, 0.5]]))


# ====================================================================== properties
def _convex_tolerance(samples: torch.Tensor, weights: torch.Tensor) -> float:
    """Rounding of the output plus the float32 weights' row sums missing 1 by m * eps."""
    eps_out = torch.finfo(samples.dtype).eps
    eps_w = torch.finfo(weights.dtype).eps * weights.shape[1]
    scale = float(samples.double().abs().max()) if samples.numel() else 0.0
    return 4 * (eps_out + eps_w) * scale + 1e-30


@given(S.latent_pairs(), st.sampled_from(Fn.SIMILARITIES), st.sampled_from([None, 0.1, 2.0]),
       S.float_dtypes())
def test_inter_weights_are_row_stochastic(pair, similarity, temperature, dtype):
    teacher, student = (z.to(dtype) for z in pair)
    before = teacher.clone(), student.clone()
    w = Fn.inter_modal_weights(teacher, student, similarity=similarity, temperature=temperature)
    assert w.dtype == dtype and w.shape == (teacher.shape[0], student.shape[0])
    assert bool(torch.isfinite(w).all()) and float(w.min()) >= 0
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    torch.testing.assert_close(w.double().sum(1), torch.ones(w.shape[0], dtype=torch.float64),
                               atol=tol, rtol=0)
    assert torch.equal(teacher, before[0]) and torch.equal(student, before[1])


@given(S.latent_pairs(square=True), st.sampled_from(["row", "legacy_broadcast", "none"]))
def test_inter_weights_never_nan(pair, normalize):
    teacher, student = pair
    w = Fn.inter_modal_weights(teacher, student, normalize=normalize, self_weight=1.0)
    assert bool(torch.isfinite(w).all()) and float(w.min()) >= 0


@given(st.data(), st.sampled_from(Fn.INTRA_MODES))
def test_intra_weights_bounds(data, mode):
    resp = data.draw(S.responsibilities())
    partners = data.draw(S.responsibilities(components=resp.shape[1]))
    w = Fn.intra_modal_weights(resp, partners, mode=mode)
    assert w.shape == (resp.shape[0], partners.shape[0])
    if mode == "hard":
        assert set(w.unique().tolist()) <= {0.0, 1.0}
        assert bool((Fn.intra_modal_weights(resp, mode="hard").diagonal() == 1).all())
    else:
        assert float(w.min()) >= 0 and float(w.max()) <= 2 + 1e-6
        if resp.shape[1] == 2:
            assert float(w.min()) >= 1 - 1e-6


@given(st.data(), st.sampled_from([None, 1, 2, 3, 20]), st.booleans(), st.booleans())
def test_dca_weights_properties(data, top_k, exclude_self, renormalize):
    n = data.draw(S.batch_sizes())
    inter = data.draw(S.dense_weights(n, n))
    resp = data.draw(S.responsibilities(n, 2))
    intra = Fn.intra_modal_weights(resp)
    w = Fn.dca_weights(inter, intra, top_k=top_k, exclude_self=exclude_self, renormalize=renormalize)
    assert bool(torch.isfinite(w).all()) and float(w.min()) >= 0
    sums = w.sum(1)
    if renormalize:
        torch.testing.assert_close(sums, torch.ones(n), atol=1e-5, rtol=0)
    else:
        assert float(sums.min()) > 0 and float(sums.max()) <= 2 + 1e-5
    if top_k is not None:
        assert int((w > 0).sum(1).max()) <= top_k
    if exclude_self and n > 1:
        lonely = (inter * intra).fill_diagonal_(0).sum(1) <= 0
        assert bool((w.diagonal()[~lonely] == 0).all())


@given(st.data(), st.integers(1, 12))
def test_topk_sparse_properties(data, k):
    w = data.draw(S.dense_weights(stochastic=False))
    index, values = Fn.topk_sparse(w, k)
    kk = min(k, w.shape[1])
    assert index.shape == values.shape == (w.shape[0], kk) and index.dtype == torch.int64
    torch.testing.assert_close(values.sum(1), torch.ones(w.shape[0]), atol=1e-5, rtol=0)
    # the kept entries are the k largest of each row
    kth = w.topk(kk, dim=1).values[:, -1:]
    assert bool((w.gather(1, index) >= kth).all())


@given(st.data())
def test_mix_is_a_convex_combination(data):
    samples = data.draw(S.sample_tensors())
    weights = data.draw(S.dense_weights(m=samples.shape[0]))
    before = samples.clone(), weights.clone()
    out = Fn.mix(weights, samples)
    assert out.dtype == samples.dtype and out.shape == (weights.shape[0], *samples.shape[1:])
    low, high = samples.double().amin(0), samples.double().amax(0)
    tol = _convex_tolerance(samples, weights)
    assert bool((out.double() >= low - tol).all()) and bool((out.double() <= high + tol).all())
    assert torch.equal(samples, before[0]) and torch.equal(weights, before[1])


@given(st.data())
def test_sparse_mix_equals_dense_mix(data):
    samples = data.draw(S.sample_tensors(dtype=data.draw(S.float_dtypes(low_precision=False))))
    m = samples.shape[0]
    index, weights = data.draw(S.sparse_weights(data.draw(S.batch_sizes()), m))
    dense = torch.zeros(index.shape[0], m).scatter_add_(1, index, weights)
    sparse_out = Fn.mix(weights, samples, index=index)
    # repeated partners are summed in float32 by scatter_add: float32 tolerance
    torch.testing.assert_close(sparse_out, Fn.mix(dense, samples), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Fn._mix_sparse_bmm(index, weights.to(samples.dtype),
                                                  samples.reshape(m, -1)).reshape(sparse_out.shape),
                               sparse_out)


@given(st.data())
def test_identity_weights_return_the_input(data):
    samples = data.draw(S.sample_tensors(dtype=data.draw(S.float_dtypes())))
    m, before = samples.shape[0], samples.clone()
    ones = torch.ones(m, 1, dtype=samples.dtype)
    assert torch.equal(Fn.mix(torch.eye(m, dtype=samples.dtype), samples), samples)
    assert torch.equal(Fn.mix(ones, samples, index=torch.arange(m)[:, None]), samples)
    assert torch.equal(MixPlan.identity(m).apply(samples), samples)
    assert torch.equal(samples, before)


@given(st.data())
def test_batched_equals_unbatched(data):
    samples = data.draw(S.sample_tensors(dtype=torch.float64))
    weights = data.draw(S.dense_weights(m=samples.shape[0], dtype=torch.float64))
    together = Fn.mix(weights, samples)
    for i in range(weights.shape[0]):
        torch.testing.assert_close(Fn.mix(weights[i:i + 1], samples)[0], together[i])


@given(st.data(), st.sampled_from([0.0, 0.1, 0.5]), st.booleans())
def test_mix_targets_rows_sum_to_one_and_match_a_loop(data, smoothing, as_indices):
    m = data.draw(S.batch_sizes())
    classes = data.draw(st.integers(1, 5))
    weights = data.draw(S.dense_weights(m=m, stochastic=False))
    labels = torch.tensor(data.draw(st.lists(st.integers(0, classes - 1), min_size=m, max_size=m)))
    targets = labels if as_indices else torch.nn.functional.one_hot(labels, classes).float()
    out = Fn.mix_targets(weights, targets, classes, smoothing)
    assert out.dtype == torch.float32 and out.shape == (weights.shape[0], classes)
    torch.testing.assert_close(out.sum(1), torch.ones(weights.shape[0]), atol=1e-5, rtol=0)
    expected = np.zeros((weights.shape[0], classes))
    for i in range(weights.shape[0]):
        total = sum(float(weights[i, j]) for j in range(m))
        for j in range(m):
            for c in range(classes):
                y = (1.0 if int(labels[j]) == c else 0.0) * (1 - smoothing) + smoothing / classes
                expected[i, c] += float(weights[i, j]) / total * y
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


@given(st.data())
def test_sparse_mix_targets_equals_dense(data):
    m = data.draw(S.batch_sizes())
    index, weights = data.draw(S.sparse_weights(data.draw(S.batch_sizes()), m))
    labels = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=m, max_size=m)))
    dense = torch.zeros(index.shape[0], m).scatter_add_(1, index, weights)
    torch.testing.assert_close(Fn.mix_targets(weights, labels, 4, index=index),
                               Fn.mix_targets(dense, labels, 4))


@settings(max_examples=25)
@given(st.data())
def test_one_hot_weights_reproduce_samples_exactly(data):
    samples = data.draw(S.sample_tensors())
    m = samples.shape[0]
    perm = torch.tensor(data.draw(st.permutations(list(range(m)))))
    one_hot = torch.nn.functional.one_hot(perm, m).float()
    assert torch.equal(Fn.mix(one_hot, samples), samples[perm])
    assert torch.equal(Fn.mix(torch.ones(m, 1), samples, index=perm[:, None]), samples[perm])


# ====================================================================== invariants
def check_kernel(kernel, *args, device, expected_dtype=None, **kwargs):
    """torchvision-style shared check: device and dtype kept, inputs untouched.

    Moves every tensor argument to ``device``, calls ``kernel`` and checks that the output
    (or every output of a tuple) lives on ``device`` with ``expected_dtype`` (default: the
    dtype of the first floating argument) and that no input was modified in place.
    """
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    inputs = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
    clones = [a.clone() for a in inputs]
    out = kernel(*args, **kwargs)
    if expected_dtype is None:
        expected_dtype = next(a.dtype for a in inputs if a.is_floating_point())
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        assert o.device.type == torch.device(device).type
        assert bool(torch.isfinite(o.double()).all()) if o.is_floating_point() else True
    floats = [o for o in outs if o.is_floating_point()]
    assert floats and all(o.dtype == expected_dtype for o in floats)
    for before, after in zip(clones, inputs):
        assert torch.equal(before, after), "an input was modified in place"
    return out


def _kernels(n: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(n)
    z_t, z_s = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    resp = torch.softmax(torch.randn(n, 2, generator=g), 1)
    w = torch.softmax(torch.randn(n, n, generator=g), 1)
    x = torch.rand(n, 3, 2, 5, generator=g).to(dtype)
    k = min(2, n)
    index, values = Fn.topk_sparse(w, k)
    labels = torch.randint(0, 3, (n,), generator=g)
    return {
        "inter": (Fn.inter_modal_weights, (z_t.to(dtype), z_s.to(dtype)), {}, dtype),
        "inter_legacy": (Fn.inter_modal_weights, (z_t.to(dtype), z_s.to(dtype)),
                         {"normalize": "legacy_broadcast", "self_weight": 10.0}, dtype),
        "intra": (Fn.intra_modal_weights, (resp.to(dtype),), {}, dtype),
        "dca": (Fn.dca_weights, (w.to(dtype), w.to(dtype)), {"top_k": 2, "exclude_self": True}, dtype),
        "topk": (Fn.topk_sparse, (w.to(dtype), 2), {}, dtype),
        "mix_dense": (Fn.mix, (w, x), {}, dtype),
        "mix_sparse": (Fn.mix, (values, x), {"index": index}, dtype),
        "mix_targets": (Fn.mix_targets, (w.to(dtype), labels, 3, 0.1), {}, torch.float32),
    }


KERNEL_NAMES = list(_kernels(1, torch.float32))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", S.FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 7, 8])
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_kernel_invariants(name, n, dtype, device):
    kernel, args, kwargs, expected = _kernels(n, dtype)[name]
    check_kernel(kernel, *args, device=device, expected_dtype=expected, **kwargs)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_mix_accumulates_in_float32(dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 4000, generator=g).to(dtype)
    # weights c / 256 with c in 0..7 are exact in float16 and bfloat16
    w = torch.randint(0, 8, (32, 64), generator=g).float() / 256
    exact = w.double() @ x.double()
    one_rounding = float((exact.to(dtype).double() - exact).abs().max())
    index = torch.arange(16).expand(32, 16).contiguous()
    sparse_exact = w[:, :16].double() @ x[:16].double()
    sparse_rounding = float((sparse_exact.to(dtype).double() - sparse_exact).abs().max())
    dense = Fn.mix(w.to(device), x.to(device))
    sparse = Fn.mix(w[:, :16].contiguous().to(device), x.to(device), index=index.to(device))
    assert dense.dtype == sparse.dtype == dtype
    # float32 accumulation: within about one final rounding (half-precision sums are far off)
    assert float((dense.cpu().double() - exact).abs().max()) <= 2 * one_rounding
    assert float((sparse.cpu().double() - sparse_exact).abs().max()) <= 2 * sparse_rounding


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_channels_last_layout_is_kept_without_copy(device):
    x = torch.rand(6, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.softmax(torch.rand(4, 6, device=device), 1)
    out = Fn.mix(w, x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, Fn.mix(w, x.contiguous()))
    flat, _ = Fn._flatten_trailing(x)
    assert flat.data_ptr() == x.data_ptr()  # a view, not a copy


def test_non_contiguous_samples_and_gradients():
    x = torch.rand(5, 8, 3).transpose(1, 2)[:, :, ::2]  # neither contiguous nor a permutation
    w = torch.softmax(torch.rand(2, 5), 1)
    torch.testing.assert_close(Fn.mix(w, x), torch.einsum("nm,mab->nab", w, x))
    xs = torch.rand(4, 3, requires_grad=True)
    ws = torch.full((2, 2), 0.5, requires_grad=True)
    Fn.mix(ws, xs, index=torch.tensor([[0, 1], [2, 3]])).sum().backward()
    torch.testing.assert_close(xs.grad, torch.full((4, 3), 0.5))
    assert ws.grad is not None


@needs_cuda
@pytest.mark.needs_cuda
def test_cpu_equals_cuda():
    kernels_cpu = _kernels(7, torch.float32)
    for name in KERNEL_NAMES:
        kernel, args, kwargs, _ = kernels_cpu[name]
        cpu = kernel(*args, **kwargs)
        cuda = kernel(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args],
                      **{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        for a, b in zip(cpu if isinstance(cpu, tuple) else (cpu,), cuda if isinstance(cuda, tuple) else (cuda,)):
            torch.testing.assert_close(a, b.cpu(), atol=1e-5, rtol=1e-4)


# ====================================================================== bad input
X3 = torch.rand(3, 4)
W33 = torch.full((3, 3), 1 / 3)
NAN = torch.tensor([[0.0, float("nan")], [1.0, 1.0]])

BAD_INPUTS = [
    # (callable, error type, message regex: argument, expectation, what was given)
    (lambda: Fn.inter_modal_weights(torch.ones(3), X3), ShapeError,
     r"teacher_z: expected a 2-D tensor, got tensor of shape \(3,\)"),
    (lambda: Fn.inter_modal_weights(X3, torch.ones(3, 5)), ShapeError,
     r"student_z: expected latent dimension 4 to match teacher_z, got latent dimension 5"),
    (lambda: Fn.inter_modal_weights(NAN, NAN), ValidationError,
     r"teacher_z: expected finite values \(no NaN or inf\), got 1 non-finite entries"),
    (lambda: Fn.inter_modal_weights(X3, X3, similarity="dot"), ValidationError,
     r"similarity: expected one of 'abs_cosine', 'cosine', got 'dot'"),
    (lambda: Fn.inter_modal_weights(X3, X3, normalize="column"), ValidationError,
     r"normalize: expected one of 'row', 'legacy_broadcast', 'none', got 'column'"),
    (lambda: Fn.inter_modal_weights(X3, X3, temperature=0), ValidationError,
     r"temperature: expected a finite number > 0, got 0"),
    (lambda: Fn.inter_modal_weights(X3, X3, temperature=1.0, normalize="none"), ValidationError,
     r"normalize: expected 'row' when temperature is given .*, got 'none'"),
    (lambda: Fn.inter_modal_weights(X3, X3, self_weight=-1), ValidationError,
     r"self_weight: expected a finite number >= 0, got -1"),
    (lambda: Fn.inter_modal_weights(X3, X3[:2], normalize="legacy_broadcast"), ShapeError,
     r"student_z: expected 3 samples to match teacher_z .*square.*, got 2 samples"),
    (lambda: Fn.inter_modal_weights(X3.long(), X3), ValidationError,
     r"teacher_z: expected a floating-point tensor .*, got tensor of shape \(3, 4\) and dtype torch.int64"),
    (lambda: Fn.intra_modal_weights(torch.tensor([[0.5, 0.6]])), ValidationError,
     r"resp: expected responsibility rows that sum to 1 .*, got a row sum off by 0.1"),
    (lambda: Fn.intra_modal_weights(torch.tensor([[-0.5, 1.5]])), ValidationError,
     r"resp: expected non-negative responsibilities, got minimum -0.5"),
    (lambda: Fn.intra_modal_weights(GAMMA, torch.ones(2, 1)), ShapeError,
     r"partner_resp: expected number of components 2 to match resp, got number of components 1"),
    (lambda: Fn.intra_modal_weights(GAMMA, mode="fuzzy"), ValidationError,
     r"mode: expected one of 'soft', 'hard', got 'fuzzy'"),
    (lambda: Fn.dca_weights(W33, top_k=0), ValidationError,
     r"top_k: expected an integer >= 1 or None, got 0"),
    (lambda: Fn.dca_weights(W33, top_k=-2), ValidationError,
     r"top_k: expected an integer >= 1 or None, got -2"),
    (lambda: Fn.dca_weights(W33, top_k=1.5), ValidationError,
     r"top_k: expected an integer >= 1 or None, got 1.5 \(float\)"),
    (lambda: Fn.dca_weights(W33, W33[:2]), ShapeError,
     r"intra: expected shape \(3, 3\) to match inter, got tensor of shape \(2, 3\)"),
    (lambda: Fn.dca_weights(-W33), ValidationError,
     r"inter: expected non-negative weights, got minimum -0.3333"),
    (lambda: Fn.dca_weights(W33[:2], exclude_self=True), ShapeError,
     r"inter: expected a square \[n, n\] matrix when exclude_self=True, got tensor of shape \(2, 3\)"),
    (lambda: Fn.dca_weights(W33, renormalize="yes"), ValidationError,
     r"renormalize: expected True or False, got 'yes'"),
    (lambda: Fn.topk_sparse(W33, 0), ValidationError, r"k: expected an integer >= 1, got 0"),
    (lambda: Fn.mix(W33, torch.ones(3, 4, dtype=torch.long)), ValidationError,
     r"samples: expected floating-point samples \(token ids cannot be interpolated: mix "
     r"embeddings instead\), got tensor of shape \(3, 4\) and dtype torch.int64"),
    (lambda: Fn.mix(W33, torch.rand(4, 2)), ShapeError,
     r"samples: expected 3 samples along dim 0 to match the columns of weights \(3, 3\), "
     r"got tensor of shape \(4, 2\)"),
    (lambda: Fn.mix(W33, torch.tensor([[1.0], [float("inf")], [0.0]])), ValidationError,
     r"samples: expected finite values \(no NaN or inf\), got 1 non-finite entries"),
    (lambda: Fn.mix(torch.tensor([[float("nan"), 0.5, 0.5]]), X3), ValidationError,
     r"weights: expected finite values \(no NaN or inf\), got 1 non-finite entries"),
    (lambda: Fn.mix(torch.ones(2, 2), X3, index=torch.tensor([[0, -1], [1, 2]])), ValidationError,
     r"index: expected positions in \[0, 3\) \(samples has 3 rows\), got positions from -1 to 2"),
    (lambda: Fn.mix(torch.ones(2, 2), X3, index=torch.tensor([[0, 5], [1, 2]])), ValidationError,
     r"index: expected positions in \[0, 3\) \(samples has 3 rows\), got positions from 0 to 5"),
    (lambda: Fn.mix(torch.ones(2, 3), X3, index=torch.tensor([[0, 1], [1, 2]])), ShapeError,
     r"weights: expected shape \(2, 2\) to match index \(sparse mixing\), got tensor of shape \(2, 3\)"),
    (lambda: Fn.mix(torch.ones(2, 2), X3, index=torch.tensor([[0.0, 1.0], [1.0, 2.0]])), ValidationError,
     r"index: expected an int64 tensor \[n, k\] of positions into samples, got tensor .*float32"),
    (lambda: Fn.mix(torch.ones(3), X3), ShapeError,
     r"weights: expected a 2-D tensor, got tensor of shape \(3,\)"),
    (lambda: Fn.mix_targets(W33, torch.tensor([0, 1, 2])), ValidationError,
     r"num_classes: expected the number of classes when targets are class indices, got None"),
    (lambda: Fn.mix_targets(W33, torch.tensor([0, 1, 2]), 3, 1.0), ValidationError,
     r"label_smoothing: expected a number in \[0, 1\), got 1.0"),
    (lambda: Fn.mix_targets(W33, torch.tensor([0, 1, 2]), 3, -0.1), ValidationError,
     r"label_smoothing: expected a number in \[0, 1\), got -0.1"),
    (lambda: Fn.mix_targets(W33, torch.tensor([0, 1, 7]), 3), ValidationError,
     r"targets: expected class indices in \[0, 3\), got values from 0 to 7"),
    (lambda: Fn.mix_targets(W33, torch.tensor([0.0, 1.0, 2.0]), 3), ValidationError,
     r"targets: expected integer class indices for a 1-D tensor .*, got tensor of shape \(3,\)"),
    (lambda: Fn.mix_targets(W33, torch.zeros(3, 2)), ValidationError,
     r"targets: expected every row to have a positive sum .*, got 3 all-zero rows"),
    (lambda: Fn.mix_targets(W33, torch.eye(3), num_classes=4), ShapeError,
     r"targets: expected 4 columns to match num_classes, got tensor of shape \(3, 3\)"),
    (lambda: Fn.mix_targets(torch.zeros(3, 3), torch.tensor([0, 1, 2]), 3), ValidationError,
     r"weights: expected every row to have a positive sum, got 3 all-zero rows"),
    (lambda: Fn.mix_targets(W33, torch.tensor([0, 1]), 3), ShapeError,
     r"targets: expected 3 rows to match the columns of weights \(3, 3\), got tensor of shape \(2,\)"),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    assert isinstance(info.value, CMDAError)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_mix_accepts_huge_finite_values_whose_sum_overflows(device):
    """The fused finiteness scan sums; an overflowing sum of finite values is no error."""
    big = torch.finfo(torch.float32).max / 2
    x = torch.full((3, 2), big, device=device)
    w = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], device=device)
    assert not torch.isfinite(x.sum())
    out = Fn.mix(w, x)
    assert torch.isfinite(out).all() and torch.allclose(out, x[:2], rtol=1e-6)
    values, index = torch.tensor([[0.5, 0.5]], device=device), torch.tensor([[0, 2]], device=device)
    assert torch.allclose(Fn.mix(values, x, index=index), x[:1], rtol=1e-6)


@needs_cuda
@pytest.mark.needs_cuda
def test_mixed_devices_raise_device_error():
    with pytest.raises(DeviceError, match=r"samples: expected a tensor on cuda:0 like weights|weights: expected a tensor on cpu like samples"):
        Fn.mix(W33.cuda(), X3)


# ------------------------------------------------------------------------------------
# The column-blocked CPU sparse path (_kernels._mix_sparse_blocked): large inputs are mixed
# one L2-sized block of columns at a time. Small block constants make it run on small data.
# ------------------------------------------------------------------------------------
def _sparse_loop(index, weights, samples):
    """out[i] = sum_t weights[i, t] * samples[index[i, t]], a float64 Python loop."""
    out = torch.zeros((index.shape[0], *samples.shape[1:]), dtype=torch.float64)
    for i in range(index.shape[0]):
        for t in range(index.shape[1]):
            out[i] += float(weights[i, t]) * samples[int(index[i, t])].double()
    return out


@pytest.fixture
def tiny_blocks(monkeypatch):
    from cmda_data.core import _kernels as Kn
    monkeypatch.setattr(Kn, "_BLOCK_MIN_BYTES", 0)
    monkeypatch.setattr(Kn, "_BLOCK_BYTES", 64)
    monkeypatch.setattr(Kn, "_BLOCK_MIN_COLUMNS", 3)  # odd widths, a partial last block
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the blocked path runs at one thread only
    calls = []
    blocked = Kn._mix_sparse_blocked
    monkeypatch.setattr(Kn, "_mix_sparse_blocked", lambda *a, **kw: calls.append(a[-1]) or blocked(*a, **kw))
    Kn.blocked_calls = calls
    yield Kn
    del Kn.blocked_calls
    torch.set_num_threads(threads)


@pytest.mark.parametrize("n, m, shape, k", [(5, 7, (11,), 3), (1, 1, (1, 7), 1),
                                            (9, 4, (3, 5, 2), 4), (3, 6, (64,), 6)])
def test_blocked_sparse_mix_equals_a_loop_and_the_unblocked_kernel(tiny_blocks, n, m, shape, k):
    g = torch.Generator().manual_seed(n * 100 + m)
    x = torch.randn(m, *shape, generator=g)
    index = torch.randint(0, m, (n, k), generator=g)
    w = torch.rand(n, k, generator=g)
    size = int(np.prod(shape))
    columns = tiny_blocks._sparse_block_columns(m, n, size, 4)
    assert columns < size or size == 1  # the blocked path really runs
    out = Fn.mix(w, x, index=index)
    assert tiny_blocks.blocked_calls == ([columns] if columns < size else [])
    torch.testing.assert_close(out.double(), _sparse_loop(index, w, x), rtol=1e-6, atol=1e-6)
    # bitwise: every element comes from the same embedding_bag arithmetic
    assert torch.equal(out.reshape(n, -1), tiny_blocks._embedding_bag_sum(index, w, x.reshape(m, -1)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_blocked_sparse_mix_other_dtypes_and_layouts(tiny_blocks, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 4, 5, generator=g).to(dtype)
    index = torch.randint(0, 6, (4, 3), generator=g)
    w = torch.rand(4, 3, generator=g).to(dtype)
    plain = tiny_blocks._embedding_bag_sum(index, w, x.reshape(6, -1)).reshape(4, 3, 4, 5)
    assert torch.equal(Fn.mix(w, x, index=index), plain)
    # channels_last stays channels_last; a strided (non-permutation) view is copied first
    cl = x.contiguous(memory_format=torch.channels_last)
    out = Fn.mix(w, cl, index=index)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, plain)
    strided = x[:, :, ::2]
    torch.testing.assert_close(Fn.mix(w, strided, index=index).double(),
                               _sparse_loop(index, w, strided), rtol=1e-2, atol=1e-2)


def test_blocked_sparse_mix_keeps_gradients(tiny_blocks):
    xs = torch.rand(4, 10, requires_grad=True)
    ws = torch.tensor([[0.25, 0.75], [0.5, 0.5]], requires_grad=True)
    index = torch.tensor([[0, 1], [2, 3]])
    Fn.mix(ws, xs, index=index).sum().backward()
    assert tiny_blocks.blocked_calls == []  # autograd: the one-call path
    expected = torch.tensor([[0.25], [0.75], [0.5], [0.5]]).expand(4, 10)
    torch.testing.assert_close(xs.grad, expected)
    torch.testing.assert_close(ws.grad, xs.detach()[index].sum(-1))
    with torch.no_grad():  # inference: blocked, same numbers
        assert torch.equal(Fn.mix(ws, xs, index=index),
                           tiny_blocks._embedding_bag_sum(index, ws, xs))
    assert len(tiny_blocks.blocked_calls) == 1


def test_sparse_block_columns_choice(monkeypatch):
    from cmda_data.core import _kernels as Kn
    assert 128 << 10 <= Kn._BLOCK_BYTES <= Kn._BLOCK_MAX_BYTES  # half an L2, within bounds
    monkeypatch.setattr(Kn, "_BLOCK_BYTES", 512 << 10)  # a 1 MiB L2
    assert Kn._sparse_block_columns(128, 128, 1024, 4) == 1024  # cache resident: one block
    assert Kn._sparse_block_columns(128, 128, 150528, 4) == 1024  # 512 KiB of partner rows
    assert Kn._sparse_block_columns(128, 100_000, 150528, 4) == Kn._BLOCK_MIN_COLUMNS
    assert Kn._sparse_block_columns(1, 1, 2_000_003, 4) % 64 == 0
    monkeypatch.setattr(Kn, "_BLOCK_BYTES", 1 << 20)  # a 2 MiB L2
    assert Kn._sparse_block_columns(128, 128, 150528, 4) == 2048


def test_l2_size_is_read_or_defaults():
    from cmda_data.core import _kernels as Kn
    assert Kn._l2_bytes() >= 1 << 10
    assert Kn._l2_bytes(default=123) in (123, Kn._l2_bytes())


@pytest.fixture
def two_threads(tiny_blocks):
    """tiny_blocks at 2 threads."""
    torch.set_num_threads(2)
    yield tiny_blocks


@pytest.mark.parametrize("n, m, shape, k", [(5, 7, (11,), 3), (1, 1, (1, 7), 1), (1, 9, (13,), 4),
                                            (9, 4, (3, 5, 2), 4), (3, 6, (64,), 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_multithreaded_sparse_mix_shares_the_blocks_out_bitwise(two_threads, n, m, shape, k, dtype, contiguous):
    """At several threads the blocks are shared out to single-threaded Python threads: the
    dense matmul's numbers, bitwise the unblocked kernel's, whichever thread mixed a block;
    the threads' own thread count is 1 and the caller's is kept."""
    from cmda_data.core import _threads

    Kn = two_threads
    g = torch.Generator().manual_seed(n * 100 + m)
    x = torch.randn(m, *shape, generator=g, dtype=dtype)
    if not contiguous:  # every other entry of the last dim (1-D samples stay a strided view)
        x = torch.cat([x, x], dim=-1)[..., ::2]
        assert not x.is_contiguous() or m == 1
    index = torch.randint(0, m, (n, k), generator=g)
    w = torch.rand(n, k, generator=g, dtype=dtype)
    dense = torch.zeros(n, m, dtype=dtype).scatter_add_(1, index, w)
    reference = Fn.mix(dense, x)
    plain = Kn._embedding_bag_sum(index, w, x.reshape(m, -1)).reshape(reference.shape)
    size = int(np.prod(shape))
    columns = Kn._sparse_block_columns(m, n, size, x.element_size())
    blocks = columns < size and Kn._flatten_trailing(x)[0].stride(1) == 1
    for _ in range(3):
        out = Fn.mix(w, x, index=index)
        torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
        assert torch.equal(out, plain)
    assert Kn.blocked_calls == ([columns] * 3 if blocks else [])
    assert torch.get_num_threads() == 2
    if blocks:
        seen = []
        _threads.run_split(lambda i: seen.append((i, torch.get_num_threads())), 7, 2)
        assert sorted(seen) == [(i, 1) for i in range(7)]
    torch.set_num_threads(1)  # one thread: the blocks in the calling thread
    assert torch.equal(Fn.mix(w, x, index=index), plain)


@pytest.mark.parametrize("bad_row", [0, 3])  # 3: a sample that no index row picks
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_mix_refuses_non_finite_samples_and_weights_on_every_path(two_threads, bad_row, value, dtype):
    """The CPU value checks (one direct read per reduction; for blocked sparse mixing, the
    check bags that sum every block while mixing) still catch every non-finite input, dense
    and sparse, blocked or not, also in a sample that no row picks."""
    x = torch.rand(4, 2, 7).to(dtype)
    x[bad_row, 1, 3] = value
    index = torch.tensor([[0, 1], [2, 0], [1, 2]])
    w = torch.full((3, 2), 0.5, dtype=dtype)
    x_ok = x.clone()
    x_ok[bad_row, 1, 3] = 0
    w_bad = w.clone()
    w_bad[2, 1] = value
    wide = torch.zeros(4, 14, 2, dtype=dtype)
    wide[..., 0] = x.reshape(4, 14)
    strided = wide[..., 0]  # [4, 14], stride (28, 2)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        calls = len(two_threads.blocked_calls)
        with pytest.raises(ValidationError, match=r"samples: expected finite values .* 1 non-finite"):
            Fn.mix(w, x, index=index)
        assert len(two_threads.blocked_calls) == calls + 1  # checked by the blocked kernel, while mixing
        with pytest.raises(ValidationError, match=r"samples: expected finite values .* 1 non-finite"):
            Fn.mix(w, x.transpose(1, 2), index=index)  # a permuted layout: mixed as it lies in memory
        with pytest.raises(ValidationError, match=r"samples: expected finite values .* 1 non-finite"):
            Fn.mix(w, strided, index=index)  # 2-D strided: one embedding_bag call, then a scan
        with pytest.raises(ValidationError, match=r"samples: expected finite values .* 1 non-finite"):
            Fn.mix(torch.full((3, 4), 0.25, dtype=dtype), x)
        with pytest.raises(ValidationError, match=r"weights: expected finite values .* 1 non-finite"):
            Fn.mix(w_bad, x, index=index)  # weights and index are refused before any mixing
        with pytest.raises(ValidationError, match=r"index: expected positions in \[0, 4\)"):
            Fn.mix(w, x, index=index + 2)
        assert len(two_threads.blocked_calls) == calls + 2
        torch.testing.assert_close(Fn.mix(w, x_ok, index=index).double(), _sparse_loop(index, w, x_ok),
                                   rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("m, n, k", [(6, 4, 3), (1, 1, 1), (7, 1, 2), (5, 0, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_blocked_check_bags_sum_every_sample(tiny_blocks, m, n, k, dtype):
    """The two check bags of the blocked kernel sum all m rows (both halves), whatever n."""
    g = torch.Generator().manual_seed(m * 10 + n)
    flat = torch.randn(m, 29, generator=g, dtype=dtype)
    index = torch.randint(0, m, (n, k), generator=g)
    w = torch.rand(n, k, generator=g, dtype=dtype)
    out, total = tiny_blocks._mix_sparse_blocked(index, w, flat, 4, check=True)
    plain, none = tiny_blocks._mix_sparse_blocked(index, w, flat, 4)
    assert none is None and torch.equal(out, plain)
    assert torch.equal(out, tiny_blocks._embedding_bag_sum(index, w, flat))
    assert total == pytest.approx(float(flat.double().sum()), rel=1e-5, abs=1e-4)
    flat[m - 1, 28] = float("nan")  # the last row, last column: the second half's bag
    assert math.isnan(tiny_blocks._mix_sparse_blocked(index, w, flat, 4, check=True)[1])


# ------------------------------------------------------------------------------------
# The dense route of the sparse path (_kernels._sparse_route): on CUDA, top-k weights of a
# small batch (m <= 16 k) are scattered into a dense [n, m] matrix and mixed with one mm.
# ------------------------------------------------------------------------------------
def test_sparse_route_choice():
    from cmda_data.core import _kernels as Kn
    assert Kn._sparse_route("cuda", 128, 8) == "dense"  # the measured case: B = 128, top-k 8
    assert Kn._sparse_route("cuda", 129, 8) == "embedding_bag"  # past 16 k: the sparse kernel
    assert Kn._sparse_route("cuda", 50_000, 8) == "embedding_bag"  # a bank: never dense
    assert Kn._sparse_route("cpu", 128, 8) == "embedding_bag"  # the CPU keeps embedding_bag
    assert Kn._sparse_route("mps", 128, 8) == "bmm"


@pytest.fixture
def dense_route(monkeypatch):
    """Make the CPU take the dense route, counting its uses."""
    from cmda_data.core import _kernels as Kn
    calls = []
    densify = Kn._densify
    monkeypatch.setattr(Kn, "_sparse_route", lambda device_type, m, k: "dense")
    monkeypatch.setattr(Kn, "_densify", lambda *a: calls.append(a[-1]) or densify(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_dense_route_equals_a_loop(dense_route, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, 4, 5, generator=g).to(dtype)
    index = torch.tensor([[0, 6, 6], [2, 2, 2], [5, 1, 3], [4, 0, 6]])  # repeated partners add up
    w = torch.rand(4, 3, generator=g).to(dtype)
    out = Fn.mix(w, x, index=index)
    assert dense_route == [7] and out.dtype == dtype and out.shape == (4, 3, 4, 5)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out.double(), _sparse_loop(index, w, x), rtol=tol, atol=tol)
    cl = Fn.mix(w, x.contiguous(memory_format=torch.channels_last), index=index)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, out, rtol=tol, atol=tol)


def test_dense_route_gradients_equal_the_sparse_kernel(dense_route):
    g = torch.Generator().manual_seed(4)
    index = torch.tensor([[0, 1, 1], [3, 2, 0]])
    x0, w0 = torch.rand(4, 6, generator=g), torch.rand(2, 3, generator=g)
    grads = []
    for route in ("dense", "sparse"):
        xs, ws = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if route == "dense":
            out = Fn.mix(ws, xs, index=index)
        else:
            from cmda_data.core import _kernels as Kn
            out = Kn._embedding_bag_sum(index, ws, xs)
        (out * torch.arange(6.0)).sum().backward()
        grads.append((xs.grad, ws.grad))
    assert dense_route == [4]
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected)


@needs_cuda
@pytest.mark.needs_cuda
def test_cuda_dense_route_equals_embedding_bag():
    from cmda_data.core import _kernels as Kn
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 3, 32, 32, generator=g).cuda()
    index, w = Fn.topk_sparse(torch.rand(128, 128, generator=g).cuda(), 8)
    assert Kn._sparse_route("cuda", 128, 8) == "dense"
    torch.testing.assert_close(Fn.mix(w, x, index=index).reshape(128, -1),
                               Kn._embedding_bag_sum(index, w, x.reshape(128, -1)), rtol=1e-5, atol=1e-5)


def _split_in_child(queue) -> None:
    from cmda_data.core import _threads

    seen = []
    _threads.run_split(lambda i: seen.append(i), 5, 2)
    queue.put(sorted(seen))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_thread_pool_works_in_a_forked_child_even_if_forked_while_its_lock_was_held():
    """A DataLoader worker forked while the parent held the pool's lock (or after it started its
    threads) gets a fresh lock and pool: no deadlock, every piece run once."""
    import multiprocessing

    from cmda_data.core import _threads

    _threads.run_split(lambda i: None, 3, 2)  # the parent's pool exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with _threads._LOCK:  # held at the fork, as by another thread of the parent
        child = context.Process(target=_split_in_child, args=(queue,))
        child.start()
    child.join(20)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    assert queue.get(timeout=5) == list(range(5))


def test_shared_blocks_under_inference_mode_and_no_grad(two_threads):
    """The pool threads take the caller's autograd state: under inference_mode the blocks write
    into inference tensors (outside it torch refuses in-place writes to them)."""
    Kn = two_threads
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 3, 5, 2, generator=g)
    index = torch.randint(0, 9, (6, 4), generator=g)
    w = torch.rand(6, 4, generator=g)
    plain = Kn._embedding_bag_sum(index, w, x.reshape(9, -1)).reshape(6, 3, 5, 2)
    with torch.inference_mode():
        inside = Fn.mix(w, x, index=index)
    with torch.no_grad():
        no_grad = Fn.mix(w, x, index=index)
    assert Kn.blocked_calls  # the blocked, shared-out path ran
    assert inside.is_inference() and torch.equal(inside, plain) and torch.equal(no_grad, plain)


def test_callers_at_different_thread_counts_get_their_own_pools():
    """A pool per thread count: a caller at 3 threads does not shut down the pool of one at 2."""
    from concurrent.futures import ThreadPoolExecutor

    from cmda_data.core import _threads

    def split(threads: int) -> list:
        seen = []
        for _ in range(20):
            _threads.run_split(lambda i: seen.append(i), 6, threads)
        return seen

    with ThreadPoolExecutor(2) as callers:
        results = [f.result() for f in [callers.submit(split, 2), callers.submit(split, 3)]]
    assert [sorted(r) for r in results] == [sorted(list(range(6)) * 20)] * 2
    assert _threads._pool(2) is not _threads._pool(3)


def test_thread_module_imports_where_there_is_no_fork(monkeypatch):
    """os.register_at_fork is POSIX only: without it the module still imports (and works)."""
    import importlib

    from cmda_data.core import _threads

    monkeypatch.delattr(os, "register_at_fork")
    try:
        importlib.reload(_threads)
        seen = []
        _threads.run_split(lambda i: seen.append(i), 4, 2)
        assert sorted(seen) == [0, 1, 2, 3]
    finally:
        monkeypatch.undo()
        importlib.reload(_threads)
