"""``cmda probe``: the end-to-end job on real data, the Python API, bad input and determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmda_data.cli import main
from cmda_data.exceptions import CMDAError
from cmda_data.probe import load_probe_data, probe, split_stratified

TINY = {"seeds": 2, "epochs": 2, "aligner_epochs": 2, "progress": False, "echo": None}


def informative(n: int = 160, classes: int = 4, seed: int = 0) -> dict:
    """Student = weak class signal + noise; teacher = strong class signal + noise (informative by construction)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    onehot = np.eye(classes)[y]
    return {"x": (onehot @ rng.normal(size=(classes, 12)) * 0.5 + rng.normal(size=(n, 12))).astype(np.float32),
            "t": (3.0 * onehot + 0.3 * rng.normal(size=(n, classes))).astype(np.float32),
            "y": y.astype(np.int64)}


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.needs_data
def test_cli_end_to_end_on_wikipedia(wikipedia_dir, tmp_path, capsys):
    from cmda_data.datasets import load_wikipedia

    table = load_wikipedia(wikipedia_dir, split="all", text_features="minilm384")
    rows = np.sort(np.random.default_rng(0).choice(len(table), 600, replace=False))
    labels = table.labels.numpy()[rows]
    np.savez(tmp_path / "wiki.npz", image=table.features("image").numpy()[rows],
             text=table.features("text").numpy()[rows], label=labels)
    out = tmp_path / "out"
    status = main(["probe", str(tmp_path / "wiki.npz"), "--student", "image", "--teacher", "text", "--label", "label",
                   "--seeds", "2", "--epochs", "2", "--aligner-epochs", "2", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    result = json.loads((out / "probe.json").read_text())

    assert result["task"] == "probe" and result["metric"] == "accuracy" and result["seeds"] == [0, 1]
    assert result["data"]["n"] == 600 and result["data"]["file"] == "wiki.npz" and len(result["data"]["sha256"]) == 64
    assert result["data"]["keys"] == {"student": "image", "teacher": "text", "label": "label"}
    for name in ("base", "base_matched", "mixup", "cmda", "random_teacher", "shuffled_teacher"):
        rec = result["methods"][name]
        assert len(rec["per_seed"]) == 2 and len(rec["curve"]) == 2 == len(rec["curve_ci95"])
        assert all(0.0 <= v <= 1.0 for v in [rec["mean"], *rec["per_seed"], *rec["curve"]]) and rec["ci95"] >= 0
        assert rec["per_seed"] == [curve[-1] for curve in rec["per_seed_curves"]]  # the last epoch, never the max
    methods = result["methods"]
    assert result["paired"]["cmda"]["delta"] == pytest.approx(
        np.mean(np.subtract(methods["cmda"]["per_seed"], methods["base"]["per_seed"])), abs=1e-12)
    effect = result["teacher_effect"]["cmda - random_teacher"]
    assert effect["delta"] == pytest.approx(
        np.mean(np.subtract(methods["cmda"]["per_seed"], methods["random_teacher"]["per_seed"])), abs=1e-12)
    assert "cmda - shuffled_teacher" in result["teacher_effect"]
    assert methods["base_matched"]["identical_to"] == "base"
    assert methods["base_matched"]["per_seed"] == methods["base"]["per_seed"]
    # stratified: every class on both sides, in proportion
    split = result["split"]
    assert split["train"] + split["test"] == 600 and split["train"] == 480
    counts = np.bincount(labels)
    assert min(split["train_per_class"]) >= 1 and min(split["test_per_class"]) >= 1
    assert np.all(np.abs(np.asarray(split["train_per_class"]) - 0.8 * counts) < 1.0 + 1e-9)
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "teacher effect cmda - random_teacher" in printed and "reading: " in printed


# ------------------------------------------------------------------------------------ Python API
def test_api_with_a_mapping_runs_and_returns_the_dict(tmp_path):
    result = probe(informative(), student="x", teacher="t", label="y", train_size=100,
                   methods=["base", "mixup", "cmda", "random_teacher"], **TINY)
    assert list(result["methods"]) == ["base", "mixup", "cmda", "random_teacher"]
    assert result["split"]["train"] == 100 and result["split"]["test"] == 60
    assert result["data"]["file"] is None and result["data"]["classes"] == 4
    assert set(result["paired"]) == {"mixup", "cmda", "random_teacher"}
    assert list(result["teacher_effect"]) == ["cmda - random_teacher"]
    assert result["reading"]["cmda - random_teacher"].startswith("teacher effect ")
    assert not list(tmp_path.iterdir())  # out=None writes nothing


def test_same_call_twice_gives_the_same_results_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    first = probe(informative(), student="x", teacher="t", label="y", **TINY)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)  # the caller's RNG does not matter
    second = probe(informative(), student="x", teacher="t", label="y", **TINY)
    for name, rec in first["methods"].items():
        assert rec["per_seed_curves"] == second["methods"][name]["per_seed_curves"], name


def test_mean_loss_form_trains_base_matched():
    result = probe(informative(), student="x", teacher="t", label="y", methods=["base", "base_matched"],
                   loss_form="mean", **TINY)
    assert "identical_to" not in result["methods"]["base_matched"]
    assert result["teacher_effect"] == {}


def test_every_method_sees_the_same_real_batches():
    """Base's batches and the real part of CMDA's batches are the same rows, epoch after epoch."""
    from cmda_data import CMDACollate
    from cmda_data.probe import _training as module

    data = load_probe_data(informative(), student="x", teacher="t", label="y")
    setup = module._setup(data, *split_stratified(data.labels), epochs=1, aligner_epochs=1, batch_size=32,
                          loss_form="sum", cmda=dict(module.CMDA_DEFAULTS))
    cmda = CMDACollate(module._bank(setup, seed=0), target="label", num_classes=4, seed=0, p=1.0, keep_real=True)

    def real_indices(loader):
        batches = [batch for _ in range(2) for batch in loader]
        return [b["index"][~b["mix_info"]["mixed"]].tolist() if "mix_info" in b else b["index"].tolist()
                for b in batches]

    base = real_indices(module._loader(setup, 0))
    assert base == real_indices(module._loader(setup, 0, cmda))
    assert base != real_indices(module._loader(setup, 1))  # and the seed changes it


def test_split_is_stratified_and_fixed():
    y = np.repeat([0, 1, 2], [2, 7, 31])
    train, test = split_stratified(y, train_frac=0.8)
    assert len(train) == 32 and len(test) == 8 and not set(train) & set(test)
    assert set(y[train]) == set(y[test]) == {0, 1, 2}
    again, _ = split_stratified(y, train_frac=0.8)
    assert np.array_equal(train, again)
    train, test = split_stratified(y, train_size=3)
    assert np.bincount(y[train]).tolist() == [1, 1, 1]


# ------------------------------------------------------------------------------------ bad input
def _bad_cases() -> list:
    good = informative(40)
    cases = {
        "missing key": ({}, {"student": "pixels"}, ["student key 'pixels'", "'t', 'x', 'y'"]),
        "1-D student": ({"x": good["x"][:, 0]}, {}, ["student key 'x'", "2-D", "reshape"]),
        "rows differ": ({"t": good["t"][:-3]}, {}, ["teacher key 't'", "40 rows", "37 rows"]),
        "float labels": ({"y": good["y"] + 0.5}, {}, ["label key 'y'", "integer class labels", "0.5"]),
        "bool labels": ({"y": good["y"] > 1}, {}, ["label key 'y'", "booleans"]),
        "string labels": ({"y": good["y"].astype(str)}, {}, ["label key 'y'", "strings"]),
        "NaN feature": ({"x": np.where(np.arange(40)[:, None] == 7, np.nan, good["x"])}, {},
                        ["student key 'x'", "NaN or inf", "row 7"]),
        "inf feature": ({"t": np.where(np.arange(40)[:, None] == 3, np.inf, good["t"])}, {},
                        ["teacher key 't'", "NaN or inf", "row 3"]),
        "complex": ({"x": good["x"].astype(np.complex64)}, {}, ["student key 'x'", "complex"]),
        "one class": ({"y": np.zeros(40, dtype=np.int64)}, {}, ["label key 'y'", "at least 2 classes"]),
        "class of one row": ({"y": np.r_[np.full(39, 1), 5]}, {}, ["label key 'y'", "at least 2 rows per class",
                                                                   "class 5"]),
        "no test rows": ({}, {"train_size": 38}, ["train_size", "test split", "38"]),
        "train size and frac": ({}, {"train_size": 20, "train_frac": 0.5}, ["train_size", "not both"]),
        "unknown method": ({}, {"methods": ["base", "cutmix"]}, ["methods", "cutmix"]),
    }
    return [pytest.param({**good, **changes}, options, words, id=name) for name, (changes, options, words)
            in cases.items()]


FLAGS = {"student": "--student", "teacher": "--teacher", "label": "--label", "train_size": "--train-size",
         "train_frac": "--train-frac"}


def _argv(path, options: dict) -> list:
    keys = {"student": "x", "teacher": "t", "label": "y", **options}
    argv = ["probe", str(path), "--no-progress", "--seeds", "2", "--epochs", "1", "--aligner-epochs", "1"]
    for name, value in keys.items():
        argv += ["--methods", *value] if name == "methods" else [FLAGS[name], str(value)]
    return argv


@pytest.mark.parametrize("arrays, options, words", _bad_cases())
def test_bad_input_is_one_line_naming_the_key(arrays, options, words, tmp_path, capsys):
    np.savez(tmp_path / "data.npz", **arrays)
    status = main([*_argv(tmp_path / "data.npz", options), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("cmda: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out").exists()

    keys = {"student": "x", "teacher": "t", "label": "y", **options}
    with pytest.raises(CMDAError) as raised:
        probe(arrays, **keys, **TINY)
    assert isinstance(raised.value, ValueError)
    for word in words:
        assert word in str(raised.value)


def test_object_arrays_are_never_unpickled(tmp_path, capsys):
    good = informative(40)
    np.savez(tmp_path / "data.npz", x=good["x"], t=good["t"], y=np.array(list(good["y"]), dtype=object))
    status = main(_argv(tmp_path / "data.npz", {}))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "label key 'y'" in err and "pickle" in err
    with pytest.raises(CMDAError, match="label key 'y'") as raised:
        load_probe_data(tmp_path / "data.npz", student="x", teacher="t", label="y")
    assert isinstance(raised.value, ValueError)


def test_a_single_npy_or_a_missing_file_is_refused(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((4, 2)))
    assert main(_argv(tmp_path / "x.npy", {})) == 2
    assert "an .npz archive" in capsys.readouterr().err
    assert main(_argv(tmp_path / "nope.npz", {})) == 2
    assert "no such file" in capsys.readouterr().err
