"""The ``cmda`` command: complete help, one-line errors, a real demo run, bank build/info."""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from cmda_data.cli import build_parser, main
from cmda_data.demo import _grid
from cmda_data.exceptions import CMDAWarning

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
    # M is the BIC minimiser among the candidates whose components hold at least d + 1 rows (full covariances)
    allowed = {m: s for m, s in bank["bic"].items() if m not in bank["degenerate"]}
    assert min(allowed, key=allowed.get) == str(bank["n_components"])
    assert all(rows < (bank["reduce_dim"] or bank["dim"]) + 1 for rows in bank["degenerate"].values())
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
    with warnings.catch_warnings():
        warnings.simplefilter("error", CMDAWarning)  # the DCA-inert warning becomes a note, said once
        status, out, err = run("demo", "--data", data, "--n", "200", "--epochs", "2", "--rows", "3",
                               "--out", str(tmp_path), "--no-progress")
    assert status == 0, err
    assert (tmp_path / f"cmda_demo_{data}.png").read_bytes()[:8] == PNG_SIGNATURE
    summary = json.loads((tmp_path / f"summary_{data}.json").read_text(encoding="utf-8"))
    finite_numbers(summary)
    inert = [note for note in summary["figure"]["notes"] if "DCA" in note]
    assert len(inert) == (summary["bank"]["n_components"] == 1)
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


# ------------------------------------------------------------------------------------ issue 15
def test_help_shows_the_real_defaults_written_in():
    """Every option's help ends with the value argparse will use (no %(default)s left), from the code it calls."""
    import inspect

    from cmda_data.bank import EmbeddingBank
    from cmda_data.cli import _defaults
    from cmda_data.core.mixture import GaussianMixture
    from cmda_data.demo._job import DemoConfig
    from cmda_data.probe import probe

    for path, parser in all_parsers(build_parser()):
        text = parser.format_help()
        assert "%(" not in text and "%%" not in text, path
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            shown = " ".join(formatter._expand_help(action).split())
            assert action.required or "(default: " in shown, (path, action.option_strings, shown)
            if action.default not in (None, False) and "(default: " not in (action.help or ""):
                assert shown.endswith(f"(default: {action.default})"), (path, action.option_strings, shown)
    parsers = dict(all_parsers(build_parser()))
    probe_help = " ".join(parsers[("cmda", "probe")].format_help().split())
    assert "torch's default); the models are small, one is usually fastest (default: 1)" in probe_help
    # the defaults are the ones of the code each command calls
    demo = parsers[("cmda", "demo")].parse_args([])
    config = DemoConfig()
    for name in ("data", "seed", "epochs", "n", "device", "rows", "top_k", "pool_size", "temperature"):
        assert getattr(demo, name) == getattr(config, name), name
    assert demo.out == str(config.out)
    build = parsers[("cmda", "bank", "build")].parse_args(["--student", "s", "--teacher", "t", "--out", "o"])
    bank_defaults = _defaults(EmbeddingBank.from_embeddings)
    assert build.fit_on == bank_defaults["fit_on"] and build.seed == bank_defaults["random_state"]
    assert build.n_components is bank_defaults["n_components"] is None
    from cmda_data.cli import _parse_candidates

    assert _parse_candidates(build.candidates) == list(bank_defaults["candidates"])
    assert build.covariance_type == inspect.signature(GaussianMixture).parameters["covariance_type"].default
    probed = parsers[("cmda", "probe")].parse_args(["d.npz", "--student", "a", "--teacher", "b", "--label", "c"])
    signature = inspect.signature(probe).parameters
    for name in ("batch_size", "threads", "loss_form"):
        assert getattr(probed, name) == signature[name].default, name


def test_a_percent_in_a_default_is_shown_as_it_is():
    from cmda_data.cli import _Formatter

    parser = argparse.ArgumentParser(prog="x", formatter_class=_Formatter)
    parser.add_argument("--pattern", default="train-%06d.tar", help="shard names")
    assert "shard names (default: train-%06d.tar)" in parser.format_help()


def test_version_flag_prints_the_versions():
    from cmda_data import __version__

    done = cmda("--version")
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith(f"cmda-data {__version__} (torch {torch.__version__}, Python ")
    status, out, _ = run("--version")  # in-process: printed to the given stdout, status 0 (no SystemExit)
    assert status == 0 and out == done.stdout == run("version")[1]
    status, out, _ = run("bank", "build", "--help")
    assert status == 0 and out.startswith("usage: cmda bank build") and "--force" in out


def _two_clusters(tmp_path):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0], [-4.0, 0.0, 0.0]])
    z = (centres[torch.arange(40) % 2] + 0.3 * torch.randn(40, 3, generator=g)).numpy()
    np.save(tmp_path / "z.npy", z)
    return ["--student", str(tmp_path / "z.npy"), "--teacher", str(tmp_path / "z.npy")]


def test_out_refuses_an_existing_bank_unless_force(tmp_path):
    from cmda_data.cli import CLIError
    from cmda_data.exceptions import CMDAError

    files = _two_clusters(tmp_path)
    bank = tmp_path / "bank"
    status, _, err = run("bank", "build", *files, "--out", str(bank), "--n-components", "2")
    assert status == 0, err
    before = {p.name: p.read_bytes() for p in bank.iterdir()}
    # a second build does not overwrite it: one line, exit 2, says why and what to do
    done = cmda("bank", "build", *files, "--out", str(bank), "--n-components", "3")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cmda: error: --out: expected a folder without a saved bank, "
                                                   f"got {str(bank)!r} (it holds bank.json, bank.safetensors)")
    assert lines[0].endswith("(hint: pass --force to replace that bank, or choose another --out)")
    assert {p.name: p.read_bytes() for p in bank.iterdir()} == before  # untouched
    assert issubclass(CLIError, CMDAError) and issubclass(CLIError, ValueError)
    # --force replaces it
    status, _, err = run("bank", "build", *files, "--out", str(bank), "--n-components", "3", "--force")
    assert status == 0, err
    status, out, _ = run("bank", "info", str(bank), "--json")
    assert status == 0 and json.loads(out)["n_components"] == 3
    # a folder without a bank is fine (the bank is added to it); a file is not a folder
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    status, _, err = run("bank", "build", *files, "--out", str(tmp_path / "other"), "--n-components", "2")
    assert status == 0 and (tmp_path / "other" / "notes.txt").read_text() == "mine"
    status, _, err = run("bank", "build", *files, "--out", str(tmp_path / "z.npy"), "--force")
    assert status == 2 and "an existing file" in err


def test_bank_build_and_info_say_when_dca_is_inert(tmp_path):
    g = torch.Generator().manual_seed(0)
    blob = (torch.randn(240, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5])).numpy()
    np.save(tmp_path / "blob.npy", blob)
    files = ["--student", str(tmp_path / "blob.npy"), "--teacher", str(tmp_path / "blob.npy")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, out, err = run("bank", "build", *files, "--out", str(tmp_path / "b"), "--candidates", "1-4")
    assert status == 0, err
    assert not [w for w in caught if "M = 1" in str(w.message)]  # said once: the note, not also a warning
    assert "M = 1 (by BIC" in out and "note: M = 1 was chosen" in out and "DCA" in out
    status, out, _ = run("bank", "info", str(tmp_path / "b"))
    assert status == 0 and "  note        M = 1 was chosen" in out
    status, out, _ = run("bank", "info", str(tmp_path / "b"), "--json")
    facts = json.loads(out)
    assert facts["dca_inert"].startswith("BIC chose M = 1 for the Gaussian mixture on the 'text' embeddings")
    assert all(f"M={m}: " in facts["dca_inert"] for m in (1, 2, 3, 4))
    # a bank with two clusters has no note
    status, out, err = run("bank", "build", *_two_clusters(tmp_path), "--out", str(tmp_path / "two"),
                           "--candidates", "1-3")
    assert status == 0 and "note:" not in out
    status, out, _ = run("bank", "info", str(tmp_path / "two"), "--json")
    assert json.loads(out)["dca_inert"] is None
