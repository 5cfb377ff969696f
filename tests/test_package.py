"""Package-level contracts: light imports, a declared public surface, runnable docs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import cmda_data

REPO = Path(__file__).resolve().parents[1]


def test_import_pulls_in_neither_transformers_nor_webdataset():
    code = (
        "import sys, cmda_data\n"
        "from cmda_data.core import functional, plan, mixture\n"
        "bad = [m for m in ('transformers', 'webdataset', 'sklearn', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_all_is_sorted_and_resolvable():
    assert list(cmda_data.__all__) == sorted(cmda_data.__all__)
    for name in cmda_data.__all__:
        assert getattr(cmda_data, name) is not None, name


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cmda_data.nope  # noqa: B018


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_code_blocks_in_docs_run(path, tmp_path, monkeypatch):
    """Every ```python block of the README and the docs runs as written (blocks of one page share a namespace)."""
    blocks = _python_blocks(path)
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, f"{path.name}", "exec"), namespace)  # noqa: S102
