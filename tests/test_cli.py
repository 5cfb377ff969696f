"""The ``cmda`` command: complete help, one-line errors, a real demo run, bank build/info."""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from cmda_data.demo import _grid
from cmda_data.cli import build_parser, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cmda(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m cmda_data ARGS`` in a subprocess (as a user would)."""
    return subprocess.run([sys.executable, "-m", "cmda_data", *args], capture_output=True, text=True, timeout=120)


def run(*args: str):
    """Run ``main`` in this process; return (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = main(list(args), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def all_parsers(parser: argparse.ArgumentParser, path=("cmda",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, path + (name,))


def finite_numbers(value, where="summary"):
    """Every number in a JSON value, checked finite; returns how many there were."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return 0
    if isinstance(value, (int, float)):
        assert math.isfinite(value), where
        return 1
    if isinstance(value, dict):
        return sum(finite_numbers(v, f"{where}.{k}") for k, v in value.items())
    return sum(finite_numbers(v, f"{where}[{i}]") for i, v in enumerate(value))


# ------------------------------------------------------------------------------------ help
HELP_CASES = {
    (): ["demo", "bank", "version", "--debug", "--version"],
    ("demo",): ["--out", "--data", "--seed", "--epochs", "--n", "--device", "--rows", "--top-k", "--pool-size",
                "--no-progress", "--debug", "cmda_demo_out", "shapes", "wikipedia", "webnews"],
    ("bank",): ["build", "info", "--debug"],
    ("bank", "build"): ["--student", "--teacher", "--out", "--student-name", "--teacher-name", "--fit-on",
                        "--n-components", "--candidates", "--covariance-type", "--reduce-dim", "--seed"],
    ("bank", "info"): ["DIR", "--json"],
    ("version",): ["--debug"],
}


@pytest.mark.parametrize("command", list(HELP_CASES), ids=lambda c: " ".join(("cmda",) + c))
def test_help_lists_every_option(command):
    done = cmda(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {' '.join(('cmda',) + command)}")
    for word in HELP_CASES[command]:
        assert word in done.stdout, (word, done.stdout)


def test_every_option_says_its_default():
    for path, parser in all_parsers(build_parser()):
        assert parser.description, f"{' '.join(path)} has no description"
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            text = formatter._expand_help(action)
            assert "default" in text or "required" in text, (path, action.option_strings, text)


def test_bare_commands_print_help():
    status, out, _ = run()
    assert status == 0 and "usage: cmda" in out
    status, out, _ = run("bank")
    assert status == 0 and "usage: cmda bank" in out


def test_version():
    status, out, _ = run("version")
    assert status == 0
    assert out.startswith("cmda-data ") and "torch " in out


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("args, words", [
    (("bank", "info", "/nonexistent/bank"), ["/nonexistent/bank", "hint: check the path"]),
    (("demo", "--data", "mnist"), ["invalid choice: 'mnist'", "cmda demo --help"]),
    (("demo", "--n", "5"), ["--n: expected an integer >= 20", "hint:"]),
    (("demo", "--device", "cuda:99"), ["--device", "hint: use --device cpu"]),
    (("bank", "build", "--teacher", "t.npy", "--out", "x"), ["--student", "required"]),
])
def test_errors_are_one_line_with_a_hint(args, words):
    done = cmda(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cmda: error: ") and "(hint: " in lines[0] and lines[0].endswith(")")
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("args", [("--debug", "bank", "info", "/nonexistent/bank"),
                                  ("bank", "info", "/nonexistent/bank", "--debug")])
def test_debug_shows_the_traceback(args):
    done = cmda(*args)
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert "FileNotFoundError" in done.stderr


def test_bad_npy_files_are_one_line(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(5, dtype=np.float32))
    np.save(tmp_path / "ok.npy", np.zeros((5, 2), dtype=np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    status, _, err = run("bank", "build", "--student", str(tmp_path / "flat.npy"),
                         "--teacher", str(tmp_path / "ok.npy"), "--out", str(tmp_path / "b"))
    assert status == 2 and err.count("\n") == 1
    assert "2-D numeric [N, d] array, got shape (5,)" in err
    status, _, err = run("bank", "build", "--student", str(tmp_path / "objects.npy"),
                         "--teacher", str(tmp_path / "ok.npy"), "--out", str(tmp_path / "b"))
    assert status == 2 and err.count("\n") == 1 and "numeric .npy array" in err  # never unpickled
    status, _, err = run("bank", "build", "--student", str(tmp_path / "ok.npy"), "--teacher",
                         str(tmp_path / "ok.npy"), "--out", str(tmp_path / "b"), "--candidates", "0-3")
    assert status == 2 and "--candidates: expected" in err


def test_missing_matplotlib_names_the_extra(monkeypatch):
    import cmda_data.demo._job as demo

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import now fails
    monkeypatch.setattr(demo, "run_demo", lambda config, echo: _grid.load_matplotlib())
    status, _, err = run("demo")
    assert status == 2
    assert err.startswith("cmda: error: matplotlib: expected the optional dependency matplotlib")
    assert err.strip().endswith("(hint: pip install -e '.[bench]')")


# ------------------------------------------------------------------------------------ demo
def test_tiny_demo_writes_a_png_and_a_json_summary(tmp_path):
    from matplotlib.image import imread

    status, out, err = run("demo", "--n", "300", "--epochs", "1", "--rows", "3", "--out", str(tmp_path),
                           "--no-progress")
    assert status == 0, err
    png, summary_file = tmp_path / "cmda_demo_shapes.png", tmp_path / "summary_shapes.json"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    height, width, channels = imread(str(png)).shape
    assert channels in (3, 4) and width >= 600 and height >= 3 * 250
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    assert finite_numbers(summary) > 20
    assert summary["aligner"]["epochs"] == 1 and summary["aligner"]["train_pairs"] == 240
    assert 0 <= summary["retrieval"]["chance"] < 1 and 0 <= summary["retrieval"]["top1"] <= 1
    bank = summary["bank"]
    assert bank["rows"] == 240 and bank["n_components"] >= 1
    assert set(bank["bic"]) == {"1", "2", "3", "4", "5", "6"}
    assert min(bank["bic"], key=bank["bic"].get) == str(bank["n_components"])  # M is the BIC minimiser
    generation = summary["generation"]
    assert generation["samples"] == 240 and 1 / 4 <= generation["mean_top_partner_weight"] <= 1
    assert set(generation["partner_agreement"]) == {"shape", "colour"}
    assert summary["figure"]["png"] == str(png)
    # the printed report: what was done, where it went
    assert str(png) in out and str(summary_file) in out and "M = " in out and "top-1" in out
    # the saved bank is what 'cmda bank info' reads
    status, info, _ = run("bank", "info", bank["path"], "--json")
    assert status == 0 and json.loads(info)["rows"] == 240


@pytest.mark.parametrize("data", ["wikipedia", "webnews"])
def test_demo_on_real_data(tmp_path, data):
    from conftest import require_data

    require_data(data)
    status, out, err = run("demo", "--data", data, "--n", "200", "--epochs", "2", "--rows", "3",
                           "--out", str(tmp_path), "--no-progress")
    assert status == 0, err
    assert (tmp_path / f"cmda_demo_{data}.png").read_bytes()[:8] == PNG_SIGNATURE
    summary = json.loads((tmp_path / f"summary_{data}.json").read_text(encoding="utf-8"))
    finite_numbers(summary)
    assert summary["retrieval"]["match"] == "same class"
    assert set(summary["generation"]["partner_agreement"]) == {"class"}


# ------------------------------------------------------------------------------------ bank
def test_bank_build_round_trip(tmp_path):
    from cmda_data.bank import EmbeddingBank

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0], [-4.0, 0.0, 0.0]])
    teacher = (centres[torch.arange(40) % 2] + 0.3 * torch.randn(40, 3, generator=g)).numpy()
    student = (teacher + 0.1 * torch.randn(40, 3, generator=g).numpy()).astype(np.float32)
    np.save(tmp_path / "student.npy", student)
    np.save(tmp_path / "teacher.npy", teacher.astype(np.float64))  # any numeric dtype is accepted
    status, out, err = run("bank", "build", "--student", str(tmp_path / "student.npy"), "--teacher",
                           str(tmp_path / "teacher.npy"), "--out", str(tmp_path / "bank"), "--candidates", "1-3")
    assert status == 0, err
    assert "40 rows, dim 3" in out and "M = 2" in out and str(tmp_path / "bank") in out
    bank = EmbeddingBank.load(tmp_path / "bank")
    assert (bank.student, bank.teachers, bank.n_components, bank.fit_on) == ("image", ("text",), 2, "text")
    np.testing.assert_array_equal(bank.embeddings["image"].numpy(), student)
    np.testing.assert_allclose(bank.embeddings["text"].numpy(), teacher, rtol=1e-6)
    # the two clusters of the file are the two components
    clusters = bank.responsibilities.argmax(1)
    assert bool((clusters[0::2] == clusters[0]).all() and (clusters[1::2] != clusters[0]).all())

    status, out, _ = run("bank", "info", str(tmp_path / "bank"))
    assert status == 0 and "rows        40" in out and "M = 2 on 'text'" in out and "bic table" in out
    status, out, _ = run("bank", "info", str(tmp_path / "bank"), "--json")
    facts = json.loads(out)
    assert facts["rows"] == 40 and facts["n_components"] == 2 and set(facts["scores"]) == {"1", "2", "3"}

    status, _, err = run("bank", "build", "--student", str(tmp_path / "student.npy"), "--teacher",
                         str(tmp_path / "teacher.npy"), "--out", str(tmp_path / "fixed"), "--n-components", "3",
                         "--fit-on", "student", "--student-name", "pixels", "--teacher-name", "caption")
    assert status == 0, err
    fixed = EmbeddingBank.load(tmp_path / "fixed")
    assert (fixed.student, fixed.teachers, fixed.n_components, fixed.fit_on) == ("pixels", ("caption",), 3, "pixels")


# ------------------------------------------------------------------------------------ figures
def test_table_figure_and_rgb_conversion(tmp_path):
    rows = [_grid.TableRow("art (article 1)", "a long text " * 30,
                           [_grid.Partner(0.6, "art", None, True), _grid.Partner(0.4, "music", None, False)])]
    path = _grid.render_mix_table(rows, tmp_path / "t.png", title="a table")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert _grid.to_rgb(torch.full((3, 4, 5), 2.0)).max() == 1.0  # clipped, channels last
    assert _grid.to_rgb(np.zeros((4, 5))).shape == (4, 5, 3)
