"""Tests of cmda_data.core.plan: MixPlan (hand-built plans checked exactly) and make_plan."""

from __future__ import annotations

import pytest
import strategies as S
import torch
from conftest import CPU_AND_CUDA, needs_cuda
from hypothesis import given
from hypothesis import strategies as st

from cmda_data.bank import EmbeddingBank
from cmda_data.bank._plan import bank_plan
from cmda_data.core import functional as Fn
from cmda_data.core.build import build_plan, make_plan
from cmda_data.core.plan import MixPlan
from cmda_data.exceptions import CMDAError, DeviceError, ShapeError, ValidationError
from cmda_data.options import MixOptions, PlanOptions


def hand_plan() -> MixPlan:
    # row 0 = .25 x0 + .75 x2 ; row 1 = original x1 ; row 2 = .5 x0 + .5 x1
    return MixPlan(index=torch.tensor([[0, 2], [1, 1], [0, 1]]),
                   weights=torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]]),
                   teacher_index=torch.tensor([0, 1, 2]),
                   mixed=torch.tensor([True, False, True]))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ====================================================================== MixPlan by hand
class TestHandBuiltPlan:
    def test_apply_vectors(self):
        x = torch.tensor([[4.0, 0.0], [1.0, 2.0], [8.0, 4.0]])
        expected = torch.tensor([[7.0, 3.0], [1.0, 2.0], [2.5, 1.0]])
        assert torch.equal(hand_plan().apply(x), expected)

    @pytest.mark.parametrize("trailing", [(), (5,), (3, 4, 4), (1, 2)], ids=str)
    def test_apply_any_trailing_shape(self, trailing):
        x = torch.rand(3, *trailing, generator=gen())
        out = hand_plan().apply(x)
        assert out.shape == x.shape
        torch.testing.assert_close(out[0], 0.25 * x[0] + 0.75 * x[2])
        assert torch.equal(out[1], x[1])
        torch.testing.assert_close(out[2], 0.5 * x[0] + 0.5 * x[1])

    def test_apply_targets(self):
        out = hand_plan().apply_targets(torch.tensor([0, 1, 2]), num_classes=3)
        torch.testing.assert_close(out, torch.tensor([[0.25, 0.0, 0.75], [0.0, 1.0, 0.0],
                                                      [0.5, 0.5, 0.0]]))

    def test_dense(self):
        torch.testing.assert_close(hand_plan().dense(4), torch.tensor(
            [[0.25, 0.0, 0.75, 0.0], [0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]))

    def test_properties_and_repr(self):
        plan = hand_plan()
        assert plan.num_outputs == 3 and plan.k == 2
        assert repr(plan) == "MixPlan(n=3, k=2, mixed=2/3, teacher=())"

    def test_integer_field_with_a_mixed_row_is_refused(self):
        with pytest.raises(ValidationError, match="token ids cannot be interpolated"):
            hand_plan().apply(torch.arange(3))

    def test_pool_too_small(self):
        with pytest.raises(ShapeError, match=r"tensor: expected at least 3 samples along dim 0 "
                           r"\(the plan indexes position 2\), got tensor of shape \(2, 4\)"):
            hand_plan().apply(torch.rand(2, 4))
        with pytest.raises(ValidationError, match=r"m: expected a pool of at least 3 samples"):
            hand_plan().dense(2)

    def test_sparse_and_dense_application_agree(self):
        # k * 8 <= m -> sparse gather; otherwise one dense matmul; both must agree
        g = gen(3)
        pool = torch.rand(40, 3, 2, generator=g)
        w = torch.softmax(torch.rand(6, 40, generator=g), 1)
        for k in (2, 5, 6, 40):
            plan = MixPlan.from_dense(w, top_k=k)
            torch.testing.assert_close(plan.apply(pool), Fn.mix(plan.dense(40), pool))


class TestIdentity:
    @pytest.mark.parametrize("dtype", [*S.FLOAT_DTYPES, torch.int64, torch.uint8], ids=str)
    def test_returns_input_exactly(self, dtype):
        x = (torch.rand(5, 3, 2, generator=gen()) * 100).to(dtype)
        before = x.clone()
        out = MixPlan.identity(5).apply(x)
        assert torch.equal(out, x) and out.dtype == dtype
        assert out.data_ptr() != x.data_ptr()  # a new tensor: never aliasing the input
        assert torch.equal(x, before)

    def test_first_n_of_a_larger_pool(self):
        x = torch.arange(6.0)[:, None]
        assert torch.equal(MixPlan.identity(4).apply(x), x[:4])

    def test_targets(self):
        out = MixPlan.identity(3).apply_targets(torch.tensor([2, 0, 1]), num_classes=3,
                                                label_smoothing=0.3)
        torch.testing.assert_close(out, torch.tensor([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1],
                                                      [0.1, 0.8, 0.1]]))

    def test_empty(self):
        assert MixPlan.identity(0).apply(torch.rand(0, 3)).shape == (0, 3)


class TestFromDense:
    W = torch.tensor([[0.2, 0.6, 0.2, 0.0], [1.0, 1.0, 2.0, 0.0]])

    def test_full_rows_are_renormalised(self):
        plan = MixPlan.from_dense(self.W)
        assert plan.k == 4 and bool(plan.mixed.all())
        torch.testing.assert_close(plan.dense(4), torch.tensor([[0.2, 0.6, 0.2, 0.0],
                                                                [0.25, 0.25, 0.5, 0.0]]))

    def test_top_k(self):
        plan = MixPlan.from_dense(self.W, top_k=1)
        assert plan.index.tolist() == [[1], [2]]
        torch.testing.assert_close(plan.weights, torch.ones(2, 1))
        assert MixPlan.from_dense(self.W, top_k=99).k == 4

    def test_rows_not_mixed_are_originals(self):
        plan = MixPlan.from_dense(self.W, top_k=2, mixed=torch.tensor([False, True]),
                                  teacher_index=torch.tensor([3, 0]))
        assert plan.index[0].tolist() == [3, 3] and plan.weights[0].tolist() == [1.0, 0.0]
        x = torch.rand(4, 2, generator=gen())
        assert torch.equal(plan.apply(x)[0], x[3])

    def test_without_renormalisation(self):
        plan = MixPlan.from_dense(self.W, renormalize=False)
        torch.testing.assert_close(plan.dense(4), self.W)


# ====================================================================== properties
@given(st.data())
def test_plan_apply_equals_mix_of_its_dense_matrix(data):
    m = data.draw(S.batch_sizes())
    weights = data.draw(S.dense_weights(m=m))
    n = weights.shape[0]
    mixed = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    top_k = data.draw(st.sampled_from([None, 1, 2, 3]))
    plan = MixPlan.from_dense(weights, top_k=top_k, mixed=mixed,
                              teacher_index=torch.tensor(data.draw(
                                  st.lists(st.integers(0, m - 1), min_size=n, max_size=n))))
    samples = data.draw(S.sample_tensors(m=m, dtype=data.draw(S.float_dtypes(low_precision=False))))
    before = samples.clone()
    out = plan.apply(samples)
    torch.testing.assert_close(out, Fn.mix(plan.dense(m).to(samples.dtype), samples))
    # rows that are not mixed are the originals, exactly
    assert torch.equal(out[~mixed], samples[plan.teacher_index[~mixed]])
    assert torch.equal(samples, before)
    torch.testing.assert_close(plan.weights.sum(1), torch.ones(n), atol=1e-5, rtol=0)


# ====================================================================== validation
class TestPlanValidation:
    base = dict(index=torch.tensor([[0, 1]]), weights=torch.tensor([[0.5, 0.5]]),
                teacher_index=torch.tensor([0]), mixed=torch.tensor([True]))

    @pytest.mark.parametrize("change, error, message", [
        ({"index": torch.tensor([[0.0, 1.0]])}, ValidationError,
         r"index: expected an int64 tensor with 2 dimension\(s\), got tensor of shape \(1, 2\) and dtype torch.float32"),
        ({"weights": torch.tensor([[0.5, 0.5]], dtype=torch.float64)}, ValidationError,
         r"weights: expected a float32 tensor \[n, k\], got tensor .* torch.float64"),
        ({"weights": torch.tensor([[1.0]])}, ShapeError,
         r"weights: expected shape \(1, 2\) to match index, got tensor of shape \(1, 1\)"),
        ({"weights": torch.tensor([[float("nan"), 1.0]])}, ValidationError,
         r"weights: expected finite values"),
        ({"weights": torch.tensor([[-0.5, 1.5]])}, ValidationError,
         r"weights: expected non-negative rows with a positive sum"),
        ({"teacher_index": torch.tensor([0, 1])}, ShapeError,
         r"teacher_index: expected 1 entries to match index, got tensor of shape \(2,\)"),
        ({"mixed": torch.tensor([1])}, ValidationError,
         r"mixed: expected a bool tensor of shape \(1,\), got tensor .* torch.int64"),
        ({"mixed": torch.tensor([False])}, ValidationError,
         r"weights: expected rows that are not mixed to be the original"),
        ({"teacher": ("text",), "teacher_choice": torch.tensor([1])}, ValidationError,
         r"teacher_choice: expected values in \[0, 1\)"),
        ({"teacher": "text"}, ValidationError, r"teacher: expected a tuple of modality names"),
        ({"inter": torch.rand(2, 3)}, ShapeError, r"inter: expected 1 rows to match index"),
    ])
    def test_bad_fields(self, change, error, message):
        with pytest.raises(error, match=message) as info:
            MixPlan(**{**self.base, **change})
        assert isinstance(info.value, CMDAError)

    def test_list_of_names_becomes_a_tuple(self):
        plan = MixPlan(**self.base, teacher=["text"], teacher_choice=torch.tensor([0]))
        assert plan.teacher == ("text",)

    def test_frozen(self):
        with pytest.raises(AttributeError):
            hand_plan().index = torch.zeros(1, 1, dtype=torch.long)

    def test_apply_needs_a_tensor(self):
        with pytest.raises(ValidationError, match=r"tensor: expected a torch.Tensor"):
            hand_plan().apply([1.0, 2.0])

    def test_apply_inplace_writes_only_the_mixed_rows(self):
        plan = MixPlan.from_dense(torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.25, 0.25, 0.5]]))
        x = torch.tensor([[0.0, 4.0], [2.0, 2.0], [8.0, 0.0]])
        expected = plan.apply(x)
        assert plan.mixed.tolist() == [True, False, True]  # row 1 keeps all its mass on itself
        out = plan.apply(x, inplace=True)
        assert out is x and torch.equal(x, expected)

    def test_apply_inplace_needs_a_square_plan(self):
        with pytest.raises(ValidationError, match="inplace: expected False for a plan that is not square"):
            hand_plan().apply(torch.rand(4, 2), inplace=True)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_to_device_and_apply_there(device):
    plan = hand_plan().to(device)
    assert plan.index.device.type == plan.weights.device.type == torch.device(device).type
    x = torch.rand(3, 2, 5, generator=gen()).to(device)
    out = plan.apply(x)
    assert out.device == x.device
    torch.testing.assert_close(out.cpu(), hand_plan().apply(x.cpu()))
    # a CPU plan applied to a tensor elsewhere moves its small index / weights along
    torch.testing.assert_close(hand_plan().apply(x), out)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("n", [1, 3, 7])
def test_make_plan_invariants(n, device):
    g = gen(n)
    t, s = torch.randn(n, 4, generator=g).to(device), torch.randn(n, 4, generator=g).to(device)
    resp = torch.softmax(torch.randn(n, 2, generator=g), 1).to(device)
    before = t.clone(), s.clone(), resp.clone()
    plan = make_plan(t, s, resp_rows=resp, top_k=2, p=0.5, generator=gen(1))
    assert plan.index.device.type == torch.device(device).type and plan.num_outputs == n
    assert plan.weights.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(before, (t, s, resp)))
    x = torch.rand(n, 3, 4, 4).to(device)
    assert plan.apply(x).shape == x.shape


# ====================================================================== make_plan
T = torch.randn(9, 6, generator=gen(5))
V = torch.randn(9, 6, generator=gen(6))
RESP = torch.softmax(3 * torch.randn(9, 2, generator=gen(7)), 1)


def _same(a: MixPlan, b: MixPlan) -> bool:
    fields = ("index", "weights", "teacher_index", "mixed", "teacher_choice", "inter", "intra")
    return a.teacher == b.teacher and all(
        (getattr(a, f) is None and getattr(b, f) is None) or torch.equal(getattr(a, f), getattr(b, f))
        for f in fields)


class TestMakePlan:
    def test_same_seed_same_plan(self):
        kwargs = dict(resp_rows=RESP, top_k=3, p=0.5)
        teachers = {"text": T, "audio": -T + 0.1}
        a = make_plan(teachers, V, generator=gen(11), **kwargs)
        b = make_plan(teachers, V, generator=gen(11), **kwargs)
        c = make_plan(teachers, V, generator=gen(12), **kwargs)
        assert _same(a, b) and not _same(a, c)

    def test_p0_is_the_identity(self):
        plan = make_plan(T, V, p=0.0, generator=gen())
        assert not bool(plan.mixed.any())
        x = torch.rand(9, 3, 2, 2, generator=gen())
        assert torch.equal(plan.apply(x), x)
        torch.testing.assert_close(plan.dense(9), torch.eye(9))

    def test_p1_mixes_every_row_with_the_functional_weights(self):
        plan = make_plan(T, V, resp_rows=RESP, generator=gen())
        assert bool(plan.mixed.all())
        expected = Fn.dca_weights(Fn.inter_modal_weights(T, V), Fn.intra_modal_weights(RESP))
        torch.testing.assert_close(plan.dense(9), expected)
        torch.testing.assert_close(plan.inter, Fn.inter_modal_weights(T, V))
        torch.testing.assert_close(plan.intra, Fn.intra_modal_weights(RESP))

    def test_p_between(self):
        plan = make_plan(T.repeat(50, 1), V.repeat(50, 1), p=0.3, generator=gen())
        assert 0.2 < float(plan.mixed.float().mean()) < 0.4

    def test_several_teachers(self):
        teachers = {"text": T, "audio": torch.randn(9, 6, generator=gen(8)), "tags": V.flip(0)}
        plan = make_plan(teachers, V, resp_rows=RESP, intra="hard", top_k=4, generator=gen(2),
                         similarity="cosine", self_weight=1.0, exclude_self=True)
        assert plan.teacher == ("text", "audio", "tags")
        assert plan.teacher_choice.dtype == torch.int64 and len(set(plan.teacher_choice.tolist())) > 1
        intra = Fn.intra_modal_weights(RESP, mode="hard")
        for r in range(9):
            name = plan.teacher[int(plan.teacher_choice[r])]
            inter = Fn.inter_modal_weights(teachers[name], V, similarity="cosine", self_weight=1.0)
            expected = Fn.dca_weights(inter, intra, top_k=4, exclude_self=True)
            torch.testing.assert_close(plan.dense(9)[r], expected[r])
            torch.testing.assert_close(plan.inter[r], inter[r])

    def test_renormalize_false_keeps_algorithm_1_rows(self):
        plan = make_plan(T, V, resp_rows=RESP, renormalize=False, top_k=5, generator=gen())
        expected = Fn.dca_weights(Fn.inter_modal_weights(T, V), Fn.intra_modal_weights(RESP),
                                  top_k=5, renormalize=False)
        torch.testing.assert_close(plan.dense(9), expected)
        # without top-k every row keeps the brightness gain of Alg. 1: sums in [1, 2]
        sums = make_plan(T, V, resp_rows=RESP, renormalize=False, generator=gen()).weights.sum(1)
        assert bool(((sums >= 1 - 1e-6) & (sums <= 2 + 1e-6)).all()) and float(sums.max()) > 1.01

    def test_rectangular_pool_with_teacher_index(self):
        teacher_index = torch.tensor([4, 0, 8])
        plan = make_plan(T[teacher_index], V, resp_rows=RESP[teacher_index], resp_cols=RESP,
                         teacher_index=teacher_index, p=0.0, generator=gen())
        x = torch.rand(9, 2, generator=gen())
        assert torch.equal(plan.apply(x), x[teacher_index])
        plan = make_plan(T[teacher_index], V, resp_rows=RESP[teacher_index], resp_cols=RESP,
                         teacher_index=teacher_index, generator=gen())
        torch.testing.assert_close(plan.dense(9), Fn.dca_weights(
            Fn.inter_modal_weights(T[teacher_index], V),
            Fn.intra_modal_weights(RESP[teacher_index], RESP)))

    def test_global_rng_untouched(self):
        state = torch.random.get_rng_state()
        make_plan({"a": T, "b": V}, V, resp_rows=RESP, p=0.5, generator=gen())
        make_plan({"a": T, "b": V}, V, p=0.5)  # generator=None: a private generator
        assert torch.equal(state, torch.random.get_rng_state())

    def test_intra_none_ignores_responsibilities(self):
        plan = make_plan(T, V, resp_rows=RESP, intra=None, generator=gen())
        assert plan.intra is None
        torch.testing.assert_close(plan.dense(9), Fn.inter_modal_weights(T, V))

    @pytest.mark.parametrize("call, error, message", [
        (lambda: make_plan(T, V, p=1.5), ValidationError,
         r"p: expected a probability in \[0, 1\], got 1.5"),
        (lambda: make_plan(T, V, generator=0), ValidationError,
         r"generator: expected a torch.Generator or None, got 0 \(int\)"),
        (lambda: make_plan({}, V), ValidationError,
         r"teacher_z: expected at least one teacher modality, got \{\}"),
        (lambda: make_plan([T], V), ValidationError,
         r"teacher_z: expected a tensor \[n, d\] or a mapping name -> tensor \[n, d\]"),
        (lambda: make_plan({"a": T, "b": T[:3]}, V), ShapeError,
         r"teacher_z\['b'\]: expected 9 rows like the first teacher, got tensor of shape \(3, 6\)"),
        (lambda: make_plan({"a": T, "b": T[:, :2]}, V), ShapeError,
         r"teacher_z\['b'\]: expected 6 columns like student_z"),
        (lambda: make_plan(T[:3], V, resp_rows=RESP[:3]), ValidationError,
         r"resp_cols: expected responsibilities of the 9 student samples"),
        (lambda: make_plan(T, V, intra="fuzzy", resp_rows=RESP), ValidationError,
         r"intra: expected one of 'soft', 'hard', got 'fuzzy'"),
        (lambda: make_plan(T, V, exclude_self=True, teacher_index=torch.arange(9).flip(0)),
         ValidationError, r"teacher_index: expected None or arange\(n\) when self_weight or "
         r"exclude_self is used"),
        (lambda: make_plan(T[:3], V, teacher_index=torch.tensor([0, 1, 9])), ValidationError,
         r"teacher_index: expected positions in \[0, 9\)"),
        (lambda: make_plan(T, V, top_k=0), ValidationError, r"top_k: expected an integer >= 1"),
    ])
    def test_bad_input(self, call, error, message):
        with pytest.raises(error, match=message) as info:
            call()
        assert isinstance(info.value, CMDAError)


@needs_cuda
@pytest.mark.needs_cuda
def test_device_mismatch_in_plan_fields():
    with pytest.raises(DeviceError):
        MixPlan(index=torch.tensor([[0]]), weights=torch.ones(1, 1).cuda(),
                teacher_index=torch.tensor([0]), mixed=torch.tensor([True]))


SQUARE_CONFIGS = {
    "soft-dense": dict(intra="soft", p=0.7),
    "hard-topk": dict(intra="hard", top_k=3, p=0.9),
    "inter-only": dict(intra=None, top_k=4, p=1.0),
    "exclude-self": dict(intra="soft", top_k=5, exclude_self=True),
    "cosine-temperature": dict(intra="soft", similarity="cosine", temperature=0.2, top_k=4),
    "self-weight-no-renorm": dict(intra="soft", self_weight=10.0, renormalize=False),
}


@pytest.mark.parametrize("teachers", [1, 2])
@pytest.mark.parametrize("name", sorted(SQUARE_CONFIGS))
def test_build_plan_validate_switch_changes_no_bit(name, teachers):
    """The trusted path (validate=False, the bank's rows) builds exactly the checked plan."""
    from cmda_data.bank._plan import row_draws
    from cmda_data.options import MixOptions, PlanOptions

    gen = torch.Generator().manual_seed(5)
    n, d = 14, 6
    teacher_z = [torch.randn(n, d, generator=gen) for _ in range(teachers)]
    student_z = torch.randn(n, d, generator=gen)
    resp = torch.softmax(3 * torch.randn(n, 3, generator=gen), 1)
    spec = PlanOptions.create(student="image", teachers=[f"t{i}" for i in range(teachers)],
                              mix=MixOptions(seed=3, rank=0, p=0.8, top_k=None).replace(**SQUARE_CONFIGS[name]))
    mixed, choice = row_draws(torch.arange(n), spec, 2)
    options = dict(similarity=spec.similarity, normalize=spec.normalize, temperature=spec.temperature,
                   self_weight=spec.self_weight, intra=spec.intra, top_k=spec.top_k,
                   exclude_self=spec.exclude_self, renormalize=spec.renormalize)
    plans = [build_plan(teacher_z, student_z, mixed=mixed, teacher_choice=choice, resp_rows=resp,
                        teacher_index=torch.arange(n), validate=validate, **options) for validate in (True, False)]
    for field in ("index", "weights", "teacher_index", "mixed", "teacher_choice"):
        assert torch.equal(getattr(plans[0], field), getattr(plans[1], field)), field
    assert bool(plans[0].mixed.any())


@pytest.mark.parametrize("name", ["soft-dense", "hard-topk", "self-weight-no-renorm", "exclude-self"])
def test_a_permuted_pool_gives_the_permuted_plan(name):
    """Rows over a pool in another order (the per-sample entry points' path, own sample found in the
    pool) get the same weights, moved with their columns: self_weight and exclude_self follow
    each row's own sample, wherever it lies."""
    from cmda_data.bank import EmbeddingBank

    config = {k: v for k, v in SQUARE_CONFIGS[name].items() if k not in ("top_k", "p")}
    gen = torch.Generator().manual_seed(2)
    n = 10
    z = {m: torch.nn.functional.normalize(torch.randn(n, 5, generator=gen), dim=1) for m in ("image", "text")}
    resp = torch.softmax(2 * torch.randn(n, 2, generator=gen), 1)
    bank = EmbeddingBank(z, student="image", teachers="text", responsibilities=resp)
    rows = torch.arange(n)
    pool = torch.randperm(n, generator=gen)
    square = bank.plan(rows, p=1.0, top_k=None, **config)
    moved = bank.plan(rows, pool, p=1.0, top_k=None, **config)
    assert torch.equal(moved.mixed, square.mixed)
    torch.testing.assert_close(moved.dense(n)[:, torch.argsort(pool)], square.dense(n), atol=1e-6, rtol=1e-5)


def _per_row_inputs(n=6, m=7, d=5, teachers=1, seed=4):
    gen = torch.Generator().manual_seed(seed)
    teacher_z = [torch.randn(n, d, generator=gen) for _ in range(teachers)]
    student_z = torch.randn(n, m, d, generator=gen)  # one pool of m candidates per row
    resp_rows = torch.softmax(3 * torch.randn(n, 3, generator=gen), 1)
    resp_cols = torch.softmax(3 * torch.randn(n, m, 3, generator=gen), 2)
    own = torch.randint(0, m, (n,), generator=gen)
    choice = torch.randint(0, teachers, (n,), generator=gen)
    return teacher_z, student_z, resp_rows, resp_cols, own, choice


@pytest.mark.parametrize("teachers", [1, 2])
@pytest.mark.parametrize("name", sorted(SQUARE_CONFIGS))
def test_one_pool_per_row_gives_each_rows_own_plan(name, teachers):
    """student_z [n, m, d]: row r's plan is its plan over its own pool alone (the 2-D path, to
    rounding; the same bits as the one-row call of the per-row path, whatever the other rows)."""
    config = {k: v for k, v in SQUARE_CONFIGS[name].items() if k != "p"}
    teacher_z, student_z, resp_rows, resp_cols, own, choice = _per_row_inputs(teachers=teachers)
    n, m = student_z.shape[:2]
    if config.get("exclude_self") or config.get("self_weight"):
        own = torch.arange(n)  # (their own sample must be a candidate: any position works)
    mixed = torch.ones(n, dtype=torch.bool)
    for validate in (True, False):
        batch = build_plan(teacher_z, student_z, mixed=mixed, teacher_choice=choice, resp_rows=resp_rows,
                           resp_cols=resp_cols, teacher_index=own, validate=validate, **config)
        assert batch.index.shape[0] == n and int(batch.index.max()) < m
        for r in range(n):
            one = slice(r, r + 1)
            args = dict(mixed=mixed[one], teacher_choice=choice[one], resp_rows=resp_rows[one],
                        teacher_index=own[one], validate=validate, **config)
            alone = build_plan([z[one] for z in teacher_z], student_z[r], resp_cols=resp_cols[r], **args)
            single = build_plan([z[one] for z in teacher_z], student_z[one], resp_cols=resp_cols[one], **args)
            for field in ("index", "weights", "mixed", "teacher_index"):
                assert torch.equal(getattr(single, field)[0], getattr(batch, field)[r]), (field, r)
            assert torch.equal(alone.mixed[0], batch.mixed[r])
            torch.testing.assert_close(alone.dense(m)[0], batch.dense(m)[r], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(SQUARE_CONFIGS))
def test_pools_given_as_positions_into_shared_candidates_are_the_same_plan(name):
    """pool_index [n, m] into [u, d] candidates (each distinct latent normalised once) == the built [n, m, d]
    pools, bit for bit, checked (validate=True) or trusted."""
    config = {k: v for k, v in SQUARE_CONFIGS[name].items() if k != "p"}
    gen = torch.Generator().manual_seed(8)
    n, m, u, d = 6, 5, 9, 4
    teacher_z = [torch.randn(n, d, generator=gen)]
    table = torch.randn(u, d, generator=gen) * torch.rand(u, 1, generator=gen) * 50
    pools = torch.stack([torch.randperm(u, generator=gen)[:m] for _ in range(n)])
    own = torch.zeros(n, dtype=torch.long)  # the rows' own samples: first in each pool
    resp_rows = torch.softmax(3 * torch.randn(n, 3, generator=gen), 1)
    resp_cols = torch.softmax(3 * torch.randn(u, 3, generator=gen), 1)[pools]
    args = dict(mixed=torch.ones(n, dtype=torch.bool), resp_rows=resp_rows, resp_cols=resp_cols, teacher_index=own,
                **config)
    built = build_plan(teacher_z, table[pools], **args)
    for validate in (True, False):
        plan = build_plan(teacher_z, table, pool_index=pools, validate=validate, **args)
        for field in ("index", "weights", "mixed", "teacher_index"):
            assert torch.equal(getattr(plan, field), getattr(built, field)), (field, validate)


@pytest.mark.parametrize("name", ["soft-dense", "hard-topk", "inter-only", "exclude-self", "cosine-temperature",
                                  "self-weight-no-renorm"])
def test_rows_that_are_not_mixed_change_no_mixed_row(name):
    """With top_k on the CPU only the mixed rows' top-k is computed: each mixed row gets the plan it
    gets when every row is mixed, bit for bit; the others are the identity."""
    config = {k: v for k, v in SQUARE_CONFIGS[name].items() if k != "p"}
    config.setdefault("top_k", 3)
    gen = torch.Generator().manual_seed(11)
    n, d = 12, 5
    teacher_z = [torch.randn(n, d, generator=gen)]
    student_z = torch.randn(n, d, generator=gen)
    resp = torch.softmax(3 * torch.randn(n, 3, generator=gen), 1)
    args = dict(resp_rows=resp, teacher_index=torch.arange(n), **config)
    every = build_plan(teacher_z, student_z, mixed=torch.ones(n, dtype=torch.bool), **args)
    for mixed in (torch.rand(n, generator=gen) < 0.5, torch.zeros(n, dtype=torch.bool)):
        some = build_plan(teacher_z, student_z, mixed=mixed, **args)
        rows = mixed & every.mixed
        assert torch.equal(some.mixed, rows)
        assert torch.equal(some.index[rows], every.index[rows]) and torch.equal(some.weights[rows], every.weights[rows])
        assert torch.equal(some.index[~rows], torch.arange(n)[~rows, None].expand(-1, some.index.shape[1]))
        assert torch.equal(some.weights[~rows, 0], torch.ones(int((~rows).sum())))


def test_one_pool_per_row_shapes_are_checked():
    teacher_z, student_z, resp_rows, resp_cols, own, _ = _per_row_inputs()
    n = student_z.shape[0]
    mixed = torch.ones(n, dtype=torch.bool)
    with pytest.raises(ShapeError, match=r"student_z: expected \[6, m, d\] latents, one pool per teacher row"):
        build_plan(teacher_z, student_z[:-1], mixed=mixed, teacher_index=own, intra=None)
    with pytest.raises(ShapeError, match=r"resp_cols: expected \[6, 7, M\] responsibilities"):
        build_plan(teacher_z, student_z, mixed=mixed, resp_rows=resp_rows, resp_cols=resp_cols[:, 1:],
                   teacher_index=own)
    with pytest.raises(ValidationError, match="resp_cols: expected responsibilities of the 7 student samples"):
        build_plan(teacher_z, student_z, mixed=mixed, resp_rows=resp_rows, teacher_index=own)
    with pytest.raises(ValidationError, match=r"teacher_index: expected positions in \[0, 7\)"):
        build_plan(teacher_z, student_z, mixed=mixed, teacher_index=own + 7, intra=None)


def test_bank_plan_with_one_pool_per_row_is_each_rows_plan_over_its_pool():
    gen = torch.Generator().manual_seed(6)
    n = 12
    z = {m: torch.nn.functional.normalize(torch.randn(n, 5, generator=gen), dim=1) for m in ("image", "text")}
    bank = EmbeddingBank(z, student="image", teachers="text",
                         responsibilities=torch.softmax(2 * torch.randn(n, 2, generator=gen), 1))
    spec = PlanOptions.create(student="image", teachers=["text"], mix=MixOptions(p=1.0, top_k=3))
    rows = torch.tensor([3, 7, 0])
    pools = torch.stack([torch.cat([r[None], torch.randperm(n, generator=gen)[:5]]).unique()[:5] for r in rows])
    pools = torch.stack([p if (p == r).any() else torch.cat([p[:-1], r[None]]).sort().values
                         for p, r in zip(pools, rows)])
    batch = bank_plan(bank, rows, pools, spec, 0)
    for r in range(len(rows)):
        alone = bank_plan(bank, rows[r:r + 1], pools[r], spec, 0)
        assert torch.equal(batch.mixed[r], alone.mixed[0])
        torch.testing.assert_close(batch.dense(5)[r], alone.dense(5)[0], atol=1e-6, rtol=1e-5)
        assert int(pools[r][batch.teacher_index[r]]) == int(rows[r])


# ------------------------------------------------------------------------------------
# The top-k of wide rows (_numerics.topk_rows) and the plan's layout that reuses it.
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "ties", "sparse", "float64"])
@pytest.mark.parametrize("n, m, k", [(5, 128, 8), (7, 259, 8), (3, 300, 3), (4, 130, 1), (6, 512, 16), (2, 40, 8)])
def test_topk_rows_is_torch_topk_bitwise(kind, n, m, k):
    """Same values and indices as torch.topk, also where rows tie (then torch.topk decides)."""
    from cmda_data.core._numerics import topk_rows

    g = torch.Generator().manual_seed(n * 1000 + m + k)
    w = torch.rand(n, m, generator=g, dtype=torch.float64 if kind == "float64" else torch.float32)
    if kind == "ties":  # few distinct values: ties inside and at the edge of the top-k
        w = torch.randint(0, 4, (n, m), generator=g).float()
        w[0] = 1.0  # an all-equal row
    elif kind == "sparse":  # rows with fewer than k positive entries
        w = w * (torch.rand(n, m, generator=g) < 0.02)
    expected = w.topk(k, dim=1)
    values, index = topk_rows(w, k)
    assert torch.equal(values, expected.values) and torch.equal(index, expected.indices)


@pytest.mark.parametrize("top_k", [1, 3, 8, 100])
@pytest.mark.parametrize("tied", [False, True])
def test_build_plan_layout_equals_from_dense_of_its_weights(top_k, tied):
    """The builder keeps the top-k that Alg. 1 kept (no second top-k over the dense rows): the
    plan is bitwise MixPlan.from_dense's top-k of the same dense weights."""
    g = torch.Generator().manual_seed(top_k)
    n = 160
    z = torch.nn.functional.normalize(torch.randn(n, 6, generator=g), dim=1)
    if tied:  # duplicated latents: tied weights
        z[n // 2:] = z[:n // 2]
    resp = torch.softmax(3 * torch.randn(n, 2, generator=g), 1)
    mixed = torch.rand(n, generator=g) < 0.7
    plan = build_plan([z], z, mixed=mixed, resp_rows=resp, teacher_index=torch.arange(n), top_k=top_k)
    dense = Fn.dca_weights(Fn.inter_modal_weights(z, z), Fn.intra_modal_weights(resp), top_k=top_k)
    reference = MixPlan.from_dense(dense, top_k=top_k, renormalize=False, mixed=mixed)
    for field in ("index", "weights", "teacher_index", "mixed"):
        assert torch.equal(getattr(plan, field), getattr(reference, field)), field
