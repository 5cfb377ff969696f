"""The example counts of a fuzz run: merged, saved as JSON, printed as a table, written into the docs.

``make fuzz`` runs ``tests/fuzz/`` at the ``thorough`` hypothesis profile with
``CMDA_FUZZ_REPORT=benchmarks/results/fuzz.json``; ``tests/conftest.py`` counts the examples
of every property and calls :func:`merge`, :func:`save` and :func:`table`; then
``python tests/fuzz/fuzz_report.py`` rewrites the figures section of ``docs/reliability.md``
from the JSON (and ``tests/fuzz/test_fuzz_report.py`` checks that the page and the JSON agree).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "fuzz.json"
DOCS = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- fuzz-figures:begin (written by make fuzz) -->", "<!-- fuzz-figures:end -->"


def merge(counts: Dict[str, Dict[str, Any]], target: str, *, profile: str) -> Dict[str, Any]:
    """This process's counts plus the parts the xdist workers wrote beside ``target`` (then removed)."""
    merged: Dict[str, Dict[str, Any]] = {k: json.loads(json.dumps(v)) for k, v in counts.items()}
    for part in sorted(Path(target).parent.glob(Path(target).name + ".*.part")):
        for key, record in json.loads(part.read_text()).items():
            mine = merged.setdefault(key, {**record, "examples": 0, "failing_examples": 0, "seconds": 0.0,
                                           "outcomes": {}})
            for field in ("examples", "failing_examples", "seconds"):
                mine[field] += record[field]
            for outcome, n in record["outcomes"].items():
                mine["outcomes"][outcome] = mine["outcomes"].get(outcome, 0) + n
        part.unlink()
    properties = sorted(merged.values(), key=lambda r: (r["file"], r["property"]))
    files: Dict[str, int] = {}
    for record in properties:
        record["seconds"] = round(record["seconds"], 2)
        files[record["file"]] = files.get(record["file"], 0) + record["examples"]
    failed = [f"{r['file']}::{r['property']}" for r in properties if r["outcomes"].get("failed")]
    return {
        "profile": profile,
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "total_examples": sum(r["examples"] for r in properties),
        "properties_count": len(properties),
        "failed_properties": failed,
        "files": dict(sorted(files.items())),
        "properties": properties,
    }


def save(report: Dict[str, Any], target: str | Path) -> None:
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(json.dumps(report, indent=1) + "\n")


def table(report: Dict[str, Any]) -> str:
    """The per-property counts as a markdown table (printed by ``make fuzz``)."""
    lines = ["| file | property | examples | seconds | result |", "|---|---|---:|---:|---|"]
    for r in report["properties"]:
        result = "failed" if r["outcomes"].get("failed") else ", ".join(
            f"{n} {outcome}" for outcome, n in sorted(r["outcomes"].items())) or "not run"
        lines.append(f"| {r['file']} | {r['property']} | {r['examples']} | {r['seconds']:.1f} | {result} |")
    lines.append(f"| **all** | **{report['properties_count']} properties** | **{report['total_examples']}** | "
                 f"**{sum(r['seconds'] for r in report['properties']):.0f}** | "
                 f"{'**failures: ' + ', '.join(report['failed_properties']) + '**' if report['failed_properties'] else 'no failure'} |")
    return "\n".join(lines)


def docs_section(report: Dict[str, Any]) -> str:
    """The figures section of ``docs/reliability.md`` (between the markers)."""
    per_file = ", ".join(f"`{name}` {n}" for name, n in report["files"].items())
    head = (f"Last `make fuzz` ({report['date']}, hypothesis profile `{report['profile']}`): "
            f"**{report['total_examples']} examples** over {report['properties_count']} properties "
            f"({per_file}); "
            + ("no property failed." if not report["failed_properties"] else
               "FAILED: " + ", ".join(report["failed_properties"]) + "."))
    return f"{BEGIN}\n{head}\n\n{table(report)}\n{END}"


def update_docs(report: Dict[str, Any], path: Path = DOCS) -> bool:
    """Rewrite the figures section of ``path``; True when it changed."""
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no section between {BEGIN!r} and {END!r}")
    new = pattern.sub(lambda _: docs_section(report), text)
    path.write_text(new)
    return new != text


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", default=str(RESULTS))
    parser.add_argument("--docs", default=str(DOCS))
    args = parser.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    print(table(report))
    print(f"\n{report['total_examples']} examples over {report['properties_count']} properties "
          f"(profile {report['profile']})")
    if update_docs(report, Path(args.docs)):
        print(f"updated the figures of {args.docs}")
    return 1 if report["failed_properties"] else 0


if __name__ == "__main__":
    sys.exit(main())
