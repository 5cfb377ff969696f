"""The fuzz figures: the JSON of the last ``make fuzz`` and docs/reliability.md agree, and the counter works."""

from __future__ import annotations

import json
import re

import fuzz_report
from conftest import REPO_ROOT


def test_the_reliability_page_shows_the_figures_of_the_last_make_fuzz():
    """The figures section of docs/reliability.md is what fuzz_report writes from benchmarks/results/fuzz.json."""
    report = json.loads(fuzz_report.RESULTS.read_text())
    text = fuzz_report.DOCS.read_text()
    section = text[text.index(fuzz_report.BEGIN):text.index(fuzz_report.END) + len(fuzz_report.END)]
    assert section == fuzz_report.docs_section(report), "run `make fuzz` (or python tests/fuzz/fuzz_report.py)"
    assert report["profile"] == "thorough" and report["total_examples"] >= 20_000
    assert report["total_examples"] == sum(r["examples"] for r in report["properties"])


def test_the_last_make_fuzz_covered_every_fuzz_file_and_found_nothing():
    report = json.loads(fuzz_report.RESULTS.read_text())
    files = {p.name for p in (REPO_ROOT / "tests" / "fuzz").glob("test_fuzz_*.py")} - {"test_fuzz_report.py"}
    assert files <= set(report["files"]), f"not in the last make fuzz: {sorted(files - set(report['files']))}"
    assert not report["failed_properties"]


def test_the_page_names_only_test_files_that_exist():
    text = fuzz_report.DOCS.read_text()
    named = set(re.findall(r"`(test_fuzz_\w+\.py)`", text))
    assert named and all((REPO_ROOT / "tests" / "fuzz" / name).exists() for name in named), named


def test_merge_adds_the_parts_of_the_workers(tmp_path):
    target = tmp_path / "fuzz.json"
    mine = {"a.py::p": {"file": "a.py", "property": "p", "description": "", "examples": 3, "failing_examples": 0,
                        "seconds": 1.0, "outcomes": {"passed": 1}}}
    part = {"a.py::p": {**mine["a.py::p"], "examples": 4}, "b.py::q": {**mine["a.py::p"], "file": "b.py",
                                                                      "property": "q", "examples": 5}}
    (tmp_path / "fuzz.json.gw0.part").write_text(json.dumps(part))
    report = fuzz_report.merge(mine, str(target), profile="ci")
    assert report["total_examples"] == 12 and report["files"] == {"a.py": 7, "b.py": 5}
    assert [r["outcomes"] for r in report["properties"]] == [{"passed": 2}, {"passed": 1}]
    assert not list(tmp_path.glob("*.part"))
    assert "| a.py | p | 7 |" in fuzz_report.table(report)
