"""cmda_data.stats against scipy.stats (Student's t, paired t-test) and a hand-written Holm."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cmda_data.exceptions import ValidationError
from cmda_data.stats import (
    compare_methods,
    holm,
    paired_comparison,
    t_cdf,
    t_ppf,
)

scipy_stats = pytest.importorskip("scipy.stats")

DOFS = [1, 2, 3, 4, 9, 30, 200, 2.5]
TS = [-1e6, -50.0, -5.0, -2.5, -1.0, -0.1, 0.0, 0.3, 1.5, 3.0, 10.0, 1e3]
QS = [1e-10, 1e-4, 0.01, 0.025, 0.1, 0.3, 0.5, 0.7, 0.9, 0.975, 0.99, 0.9999]


def _close(ours: float, ref: float) -> bool:
    return math.isclose(ours, ref, rel_tol=1e-9, abs_tol=1e-12 if abs(ref) < 1e-6 else 0.0)


# ---------------------------------------------------------------------------------------
# Student's t
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dof", DOFS)
def test_t_cdf_matches_scipy(dof):
    for t in TS:
        assert _close(t_cdf(t, dof), float(scipy_stats.t.cdf(t, dof))), (t, dof)


@pytest.mark.parametrize("dof", DOFS)
def test_t_ppf_matches_scipy_and_inverts_cdf(dof):
    for q in QS:
        t = t_ppf(q, dof)
        assert _close(t, float(scipy_stats.t.ppf(q, dof))), (q, dof)
        assert math.isclose(t_cdf(t, dof), q, rel_tol=1e-9), (q, dof)


@pytest.mark.parametrize("t", [-1e-8, 1e-8, 0.5, -3.0, 1e8])
def test_t_cdf_closed_forms(t):
    # dof = 1 (Cauchy) and dof = 2 have closed forms; tiny t checks there is no cancellation
    assert math.isclose(t_cdf(t, 1), 0.5 + math.atan(t) / math.pi, rel_tol=1e-12)
    assert math.isclose(t_cdf(t, 2), 0.5 + t / (2.0 * math.sqrt(2.0 + t * t)), rel_tol=1e-12)


def test_t_infinities_and_symmetry():
    assert t_cdf(math.inf, 3) == 1.0 and t_cdf(-math.inf, 3) == 0.0
    assert t_cdf(0.0, 7) == 0.5 and t_ppf(0.5, 7) == 0.0
    assert t_ppf(0.2, 4) == -t_ppf(0.8, 4)
    assert math.isclose(t_cdf(-2.0, 6) + t_cdf(2.0, 6), 1.0, rel_tol=1e-15)


@pytest.mark.parametrize("call, name", [
    (lambda: t_cdf(1.0, 0), "dof"), (lambda: t_cdf(1.0, -2.0), "dof"), (lambda: t_cdf(1.0, math.nan), "dof"),
    (lambda: t_cdf(math.nan, 3), "t"), (lambda: t_ppf(0.0, 3), "q"), (lambda: t_ppf(1.0, 3), "q"),
    (lambda: t_ppf(1.5, 3), "q"), (lambda: t_ppf(0.5, 0), "dof"),
])
def test_t_rejects_bad_arguments(call, name):
    with pytest.raises(ValidationError, match=rf"^{name}: expected"):
        call()


# ---------------------------------------------------------------------------------------
# paired_comparison
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, seed", [(2, 0), (2, 1), (3, 2), (5, 3), (5, 4), (10, 5), (40, 6)])
def test_paired_comparison_matches_scipy(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.7, 0.05, n)
    b = a - rng.normal(0.01, 0.02, n)
    result = paired_comparison(a.tolist(), b.tolist())
    d = a - b
    half = scipy_stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    assert result["n"] == n and isinstance(result["n"], int)
    assert math.isclose(result["delta"], float(d.mean()), rel_tol=1e-12, abs_tol=1e-15)
    assert math.isclose(result["ci95"], float(half), rel_tol=1e-9)
    assert math.isclose(result["p"], float(scipy_stats.ttest_rel(a, b).pvalue), rel_tol=1e-9)
    json.dumps(result)  # plain Python values only


def test_paired_comparison_level_and_input_types():
    a, b = [0.71, 0.74, 0.70, 0.69], [0.70, 0.71, 0.70, 0.66]
    d = np.subtract(a, b)
    r90 = paired_comparison(a, b, level=0.9)
    assert math.isclose(r90["ci95"], scipy_stats.t.ppf(0.95, 3) * d.std(ddof=1) / 2.0, rel_tol=1e-9)
    reference = paired_comparison(a, b)
    f64 = torch.float64
    for x, y, tol in [(tuple(a), tuple(b), 1e-12), (np.array(a), np.array(b), 1e-12),
                      (torch.tensor(a, dtype=f64), torch.tensor(b, dtype=f64), 1e-12),
                      (torch.tensor(a), np.array(b, dtype=np.float32), 1e-3)]:  # float32: rounded inputs
        got = paired_comparison(x, y)
        assert got["n"] == 4 and math.isclose(got["p"], reference["p"], rel_tol=tol)
        assert all(type(v) in (float, int) for v in got.values())


def test_paired_comparison_edge_cases():
    assert paired_comparison([0.9], [0.4]) == {"delta": 0.5, "ci95": None, "p": None, "n": 1}
    assert paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == {"delta": 0.0, "ci95": 0.0, "p": 1.0, "n": 3}
    assert paired_comparison([1.5, 2.5, 3.5], [1.0, 2.0, 3.0]) == {"delta": 0.5, "ci95": 0.0, "p": 0.0, "n": 3}


@pytest.mark.parametrize("a, b, name", [
    ([1.0, 2.0], [1.0], "b"), ([], [], "a"), ([1.0, math.nan], [1.0, 2.0], "a"),
    ([1.0, 2.0], [1.0, math.inf], "b"), ([[1.0, 2.0]], [[1.0, 2.0]], "a"),
    (torch.ones(2, 2), torch.ones(2, 2), "a"), (["x", "y"], [1.0, 2.0], "a"),
])
def test_paired_comparison_rejects_bad_input(a, b, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected") as info:
        paired_comparison(a, b)
    assert isinstance(info.value, ValidationError)


@pytest.mark.parametrize("level", [0.0, 1.0, 95, math.nan, True])
def test_paired_comparison_rejects_bad_level(level):
    with pytest.raises(ValidationError, match="^level: expected"):
        paired_comparison([1.0, 2.0], [0.0, 0.5], level=level)


# ---------------------------------------------------------------------------------------
# Holm
# ---------------------------------------------------------------------------------------
def _holm_reference(pvalues):
    """Textbook Holm: sort, multiply the k-th smallest by (m - k), cumulative max, cap at 1."""
    present = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(present, key=lambda i: pvalues[i])
    m, out, best = len(order), [None] * len(pvalues), 0.0
    for k, i in enumerate(order):
        best = max(best, (m - k) * pvalues[i])
        out[i] = min(1.0, best)
    return out


def test_holm_hand_cases():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.01]) == pytest.approx([0.5, 0.02])
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([None, 0.01, None, 0.04]) == [None, pytest.approx(0.02), None, pytest.approx(0.04)]
    assert holm([]) == [] and holm([None]) == [None]


@given(st.lists(st.one_of(st.none(), st.floats(0.0, 1.0)), max_size=12))
def test_holm_properties(pvalues):
    adjusted = holm(pvalues)
    expected = _holm_reference(pvalues)
    assert len(adjusted) == len(expected)
    assert all(q == r if r is None else math.isclose(q, r, rel_tol=1e-12) for q, r in zip(adjusted, expected))
    pairs = [(p, q) for p, q in zip(pvalues, adjusted) if p is not None]
    assert all((p is None) == (q is None) for p, q in zip(pvalues, adjusted))
    assert all(p <= q <= 1.0 for p, q in pairs)
    ordered = [q for _, q in sorted(pairs)]
    assert ordered == sorted(ordered)  # monotone in the raw order


@pytest.mark.parametrize("bad", [[0.1, 1.5], [-0.1], [math.nan], ["x"]])
def test_holm_rejects_bad_pvalues(bad):
    with pytest.raises(ValidationError, match="^pvalues: expected"):
        holm(bad)


# ---------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------
RUNS = {
    "base": [0.70, 0.72, 0.71, 0.69, 0.73],
    "ours": [0.75, 0.76, 0.74, 0.74, 0.77],
    "kd": [0.71, 0.73, 0.73, 0.70, 0.73],
    "no_kd": [0.70, 0.71, 0.72, 0.70, 0.72],
}


def test_compare_methods_structure_and_joint_holm():
    runs = dict(RUNS, cmda=RUNS["ours"], random_teacher=RUNS["kd"])
    out = compare_methods(runs, teacher_pairs=[("cmda", "random_teacher"), ("cmda", "missing"),
                                               ("cmda", "random_teacher")])
    assert list(out["paired"]) == ["ours", "kd", "no_kd", "cmda", "random_teacher"]
    assert list(out["teacher_effect"]) == ["cmda - random_teacher"]
    for name, entry in out["paired"].items():
        assert list(entry) == ["vs", "delta", "ci95", "p", "p_holm", "n"]
        single = paired_comparison(runs[name], runs["base"])
        assert {k: entry[k] for k in single} == single
    effect = out["teacher_effect"]["cmda - random_teacher"]
    assert list(effect) == ["method", "control", "delta", "ci95", "p", "p_holm", "n"]
    assert effect["delta"] == pytest.approx(np.mean(np.subtract(RUNS["ours"], RUNS["kd"])))
    # Holm runs over every comparison of the file, both blocks together
    entries = [*out["paired"].values(), *out["teacher_effect"].values()]
    assert [e["p_holm"] for e in entries] == holm([e["p"] for e in entries])
    json.dumps(out)


def test_compare_methods_without_reference_or_pairs():
    assert compare_methods(RUNS, reference="absent", teacher_pairs=()) == {"paired": {}, "teacher_effect": {}}
    wide = compare_methods(RUNS, level=0.99)["paired"]["ours"]["ci95"]
    assert wide > compare_methods(RUNS)["paired"]["ours"]["ci95"]


def test_compare_methods_single_seed_keeps_none():
    out = compare_methods({"base": [0.5], "cmda": [1.0], "random_teacher": [0.2]})
    assert [e["p"] for e in out["teacher_effect"].values()] == [None]
    assert [e["p_holm"] for e in out["paired"].values()] == [None, None]
