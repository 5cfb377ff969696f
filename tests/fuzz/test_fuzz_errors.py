"""Fuzzed bad input: every public function raises only CMDAError subclasses, naming the argument.

Each property takes a valid call, replaces ONE argument by a bad value (a wrong type, an
out-of-range or non-finite number, a huge integer, a complex / integer / wrong-rank tensor,
a tensor on the ``meta`` device) and requires either a result or a ``CMDAError`` whose
message follows the house template ``"<argument>: expected ..., got ..."``. Meta tensors and
mixed devices must give a ``DeviceError``. The regressions of issue 14 come first.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Dict

import numpy as np
import pytest
import strategies as S
import torch
from fuzz_harness import assert_untouched, examples, expect_cmda_error, no_subprocess, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from cmda_data import (
    CMDAError,
    DeviceError,
    GaussianMixture,
    MixOptions,
    ValidationError,
    make_plan,
    select_n_components,
)
from cmda_data.cli import main as cli_main
from cmda_data.core import functional as Fn
from cmda_data.core import losses


# ------------------------------------------------------------------ regressions of issue 14
def test_meta_tensors_give_a_device_error_naming_the_argument():
    meta = torch.ones(3, 4, device="meta")
    with pytest.raises(DeviceError, match=r"^samples: expected a tensor with data"):
        Fn.mix(torch.full((2, 3), 1 / 3), meta[:, :2].to("meta"))
    with pytest.raises(DeviceError, match=r"^teacher_z: expected a tensor with data"):
        Fn.inter_modal_weights(meta, torch.ones(5, 4))
    with pytest.raises(DeviceError, match=r"^X: expected a tensor with data"):
        GaussianMixture(2).fit(meta)


def test_num_classes_1e20_is_a_validation_error():
    weights, targets = torch.tensor([[1.0]]), torch.tensor([0])
    for bad in (1e20, 10 ** 20):
        with pytest.raises(ValidationError, match=r"^num_classes: expected"):
            Fn.mix_targets(weights, targets, num_classes=bad)


def test_cli_refuses_complex_embeddings(tmp_path, capsys):
    """The CLI cast complex .npy input to float32, dropping the imaginary part without a word."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "student.npy", (rng.normal(size=(20, 4)) + 1j * rng.normal(size=(20, 4))).astype(np.complex64))
    np.save(tmp_path / "teacher.npy", rng.normal(size=(20, 4)).astype(np.float32))
    with no_subprocess():
        code = cli_main(["bank", "build", "--student", str(tmp_path / "student.npy"),
                         "--teacher", str(tmp_path / "teacher.npy"), "--out", str(tmp_path / "bank")])
    assert code == 2
    assert "--student: expected real-valued embeddings, got complex dtype complex64" in capsys.readouterr().err
    assert not (tmp_path / "bank").exists()


def test_cli_refuses_float64_values_beyond_float32(tmp_path, capsys):
    np.save(tmp_path / "student.npy", np.full((20, 4), 1e300))
    np.save(tmp_path / "teacher.npy", np.ones((20, 4), dtype=np.float32))
    code = cli_main(["bank", "build", "--student", str(tmp_path / "student.npy"),
                     "--teacher", str(tmp_path / "teacher.npy"), "--out", str(tmp_path / "bank")])
    assert code == 2 and "--student: expected values within float32's range" in capsys.readouterr().err


# ------------------------------------------------------------------ one bad argument per call
def _valid_calls() -> Dict[str, tuple]:
    """name -> (function, valid keyword arguments, names of its tensor arguments)."""
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    resp = torch.softmax(torch.randn(3, 2, generator=g), 1)
    resp5 = torch.softmax(torch.randn(5, 2, generator=g), 1)
    w = torch.softmax(torch.randn(3, 5, generator=g), 1)
    samples = torch.randn(5, 2, 2, generator=g)
    index = torch.tensor([[0, 4], [1, 1], [2, 3]])
    w2 = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    X = torch.randn(12, 2, generator=g, dtype=torch.float64)
    z = [torch.randn(4, 3, generator=g) for _ in range(2)]
    return {
        "inter_modal_weights": (Fn.inter_modal_weights, dict(teacher_z=t, student_z=s, similarity="cosine",
                                                             normalize="row", temperature=0.5, self_weight=None)),
        "intra_modal_weights": (Fn.intra_modal_weights, dict(resp=resp, partner_resp=resp5, mode="soft")),
        "dca_weights": (Fn.dca_weights, dict(inter=w, intra=w * 2, top_k=2, exclude_self=False, renormalize=True)),
        "topk_sparse": (Fn.topk_sparse, dict(weights=w, k=2)),
        "mix": (Fn.mix, dict(weights=w, samples=samples)),
        "mix_sparse": (Fn.mix, dict(weights=w2, samples=samples, index=index)),
        "mix_targets": (Fn.mix_targets, dict(weights=w, targets=torch.tensor([0, 1, 2, 3, 1]), num_classes=4,
                                             label_smoothing=0.1)),
        "mix_targets_sparse": (Fn.mix_targets, dict(weights=w2, targets=torch.softmax(s[:, :3], 1), index=index)),
        "make_plan": (make_plan, dict(teacher_z=t, student_z=s, resp_rows=resp, resp_cols=resp5, top_k=2,
                                      temperature=None, p=1.0, generator=torch.Generator().manual_seed(0),
                                      teacher_index=torch.tensor([0, 1, 2]))),
        "GaussianMixture.fit": (lambda X, n_components, covariance_type, reg_covar, max_iter: GaussianMixture(
            n_components, covariance_type=covariance_type, reg_covar=reg_covar, max_iter=max_iter,
            random_state=0).fit(X), dict(X=X, n_components=2, covariance_type="diag", reg_covar=1e-6, max_iter=5)),
        "select_n_components": (select_n_components, dict(X=X, candidates=[1, 2], criterion="bic")),
        "eq7_loss": (losses.eq7_loss, dict(latents=z, tau=0.5, reduction="mean")),
        "eq8_loss": (losses.eq8_loss, dict(latents=z, labels=torch.tensor([0, 1, 0, 1]), tau=0.5)),
        "supcon_loss": (losses.supcon_loss, dict(latents=z, labels=torch.tensor([0, 1, 0, 1]), tau=0.5,
                                                 base_temperature=0.07)),
        "joint_loss": (losses.joint_loss, dict(task_loss=torch.tensor(1.0), align_loss=torch.tensor(2.0), lam=0.1)),
    }


CALLS = _valid_calls()


def _parameters(function: Callable) -> list:
    return list(inspect.signature(function).parameters)


def _bad_tensor_values(value: torch.Tensor) -> list:
    """Tensors wrong for the argument ``value``: meta, complex, wrong rank, empty, non-finite, integer / float."""
    out = [value.to("meta"), value.to(torch.complex64), value.reshape(-1) if value.ndim > 1 else value[None, None],
           value.reshape(-1)[:0], torch.full(value.shape, float("nan")), torch.full(value.shape, float("inf"))]
    out.append(value.long() if value.is_floating_point() else value.float())
    if value.is_floating_point():
        out.append(-value.abs() - 1)
    return out


@pytest.mark.parametrize("name", sorted(CALLS))
@settings(max_examples=examples(0.5))
@given(data=st.data())
def test_one_bad_argument_gives_a_cmda_error_naming_it(name, data):
    """Any function, one argument replaced by a bad value: a result or a CMDAError naming an argument."""
    function, kwargs = CALLS[name]
    argument = data.draw(st.sampled_from(sorted(kwargs)), label="argument")
    value = kwargs[argument]
    if isinstance(value, torch.Tensor):
        bad = data.draw(st.one_of(st.sampled_from(_bad_tensor_values(value)), S.bad_scalars()), label="bad")
    elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        bad = data.draw(st.one_of(S.bad_scalars(), st.just([v.to("meta") for v in value]),
                                  st.just([value[0], value[1][:2]]), st.just([])), label="bad")
    else:
        bad = data.draw(S.bad_scalars(), label="bad")
    call = {**kwargs, argument: bad}
    if "generator" in call and isinstance(kwargs.get("generator"), torch.Generator) and argument != "generator":
        call["generator"] = torch.Generator().manual_seed(0)
    saved = snapshot(kwargs)
    with no_subprocess():
        expect_cmda_error(lambda: function(**call), _parameters(function) + ["samples", "weights", "latents"])
    assert_untouched(saved)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_meta_or_mixed_devices_give_a_device_error(name):
    """Every tensor argument on the meta device (alone, then all of them): DeviceError."""
    function, kwargs = CALLS[name]
    tensors = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) or (
        isinstance(v, list) and v and isinstance(v[0], torch.Tensor))]
    assert tensors
    for choice in [[k] for k in tensors] + [tensors]:
        call = dict(kwargs)
        for k in choice:
            call[k] = call[k].to("meta") if isinstance(call[k], torch.Tensor) else [v.to("meta") for v in call[k]]
        if "generator" in call:
            call["generator"] = torch.Generator().manual_seed(0)
        with pytest.raises(DeviceError) as info:
            function(**call)
        assert any(str(info.value).startswith(k) for k in kwargs) or "meta" in str(info.value)


@settings(max_examples=examples())
@given(field=st.sampled_from([f.name for f in dataclasses.fields(MixOptions)]), bad=S.bad_scalars())
def test_mix_options_refuse_bad_values_by_name(field, bad):
    """MixOptions(field=bad): accepted or a ValidationError that starts with the field's name."""
    ok, error = expect_cmda_error(lambda: MixOptions(**{field: bad}), [field])
    if not ok:
        assert str(error).startswith(f"{field}: expected")


@settings(max_examples=examples())
@given(option=st.sampled_from(["n_components", "covariance_type", "tol", "reg_covar", "max_iter", "n_init",
                               "init_params", "random_state", "warm_start", "verbose", "verbose_interval"]),
       bad=S.bad_scalars())
def test_gaussian_mixture_refuses_bad_options_by_name(option, bad):
    """GaussianMixture(option=bad): accepted or a CMDAError that starts with the option's name."""
    expect_cmda_error(lambda: GaussianMixture(**{option: bad}), [option])


@settings(max_examples=examples(0.5))
@given(X=st.one_of(S.bad_scalars(), st.sampled_from([
    np.array([[1 + 2j, 3.0]] * 4), np.array([["a", "b"]] * 4), np.zeros((0, 2)), np.ones((4, 2)) * np.nan,
    torch.ones(4, 2, device="meta"), torch.ones(4, 2, dtype=torch.complex64), np.ones(4)])))
def test_gaussian_mixture_refuses_bad_data_by_name(X):
    """fit / predict_proba of bad X (complex, strings, empty, NaN, meta, 1-D): a CMDAError naming X."""
    expect_cmda_error(lambda: GaussianMixture(1).fit(X), ["X"])
    fitted = GaussianMixture(1).fit(torch.randn(5, 2, generator=torch.Generator().manual_seed(0)))
    expect_cmda_error(lambda: fitted.predict_proba(X), ["X"])


def test_every_public_name_is_reachable_and_errors_are_cmda_errors():
    """Every name of cmda_data.__all__ imports; every exception class there derives from CMDAError."""
    import cmda_data

    for name in cmda_data.__all__:
        value = getattr(cmda_data, name)
        if isinstance(value, type) and issubclass(value, Exception) and not issubclass(value, Warning):
            assert issubclass(value, CMDAError), name
