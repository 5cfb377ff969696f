"""The documentation site: it builds with ``mkdocs build --strict`` and has no broken internal links.

The site is built once per module into a temporary folder (a few seconds). Every generated
HTML file is parsed; each ``href`` / ``src`` that stays on the site is resolved like a browser
would (relative to the page's URL, ``dir/`` meaning ``dir/index.html``) and must name an
existing file, and a ``#fragment`` must name an ``id`` on the target page.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MISSING = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
           if importlib.util.find_spec(m.split(".")[0]) is None
           or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"the docs toolchain is not installed ({', '.join(MISSING)}): pip install -e '.[docs]'")

#: link attributes checked, per tag
LINK_ATTRS = {"a": ("href",), "link": ("href",), "img": ("src",), "script": ("src",), "source": ("src",)}


class _Page(HTMLParser):
    """Collects the ids and the links of one HTML file."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set = set()
        self.links: list = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        for key in ("id", "name"):
            if values.get(key):
                self.ids.add(values[key])
        for attr in LINK_ATTRS.get(tag, ()):
            if values.get(attr) is not None:
                self.links.append((tag, values[attr]))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
         "-d", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail("mkdocs build --strict failed:\n" + (proc.stdout + proc.stderr)[-4000:])
    return out


@pytest.fixture(scope="module")
def pages(site) -> dict:
    parsed = {}
    for path in sorted(site.rglob("*.html")):
        page = _Page()
        page.feed(path.read_text(encoding="utf-8"))
        parsed[path] = page
    return parsed


def _target(site: Path, page: Path, url: str):
    """``(file, fragment)`` a site-internal link points to, or None for an external link."""
    parts = urlsplit(url)
    if parts.scheme or parts.netloc or url.startswith(("mailto:", "javascript:", "data:")):
        return None
    if not parts.path:  # "#fragment" on the same page
        return page, unquote(parts.fragment)
    base = PurePosixPath(page.relative_to(site).as_posix()).parent
    if parts.path.startswith("/"):
        resolved = PurePosixPath(parts.path.lstrip("/"))
    else:
        resolved = base / unquote(parts.path)
    # normalise "a/../b" without touching the file system
    stack: list = []
    for part in resolved.parts:
        if part == "..":
            if not stack:
                return site / "..", ""  # escapes the site: reported as broken
            stack.pop()
        elif part not in (".", ""):
            stack.append(part)
    file = site.joinpath(*stack) if stack else site
    if parts.path.endswith("/") or file.is_dir():
        file = file / "index.html"
    return file, unquote(parts.fragment)


def test_site_builds_strict(site):
    assert (site / "index.html").is_file()
    assert (site / "404.html").is_file()


def test_no_broken_internal_links(site, pages):
    broken = []
    checked = 0
    for page, parsed in pages.items():
        for tag, url in parsed.links:
            target = _target(site, page, url)
            if target is None:
                continue
            file, fragment = target
            checked += 1
            where = f"{page.relative_to(site)}: <{tag}> {url!r}"
            if not file.is_file():
                broken.append(f"{where} -> missing file")
            elif fragment and file.suffix == ".html":
                ids = pages[file].ids if file in pages else set()
                if fragment not in ids:
                    broken.append(f"{where} -> no id {fragment!r} in {file.relative_to(site)}")
    assert checked > 100, f"only {checked} internal links found: is the site empty?"
    assert not broken, "broken internal links:\n" + "\n".join(broken[:50])


def test_every_page_is_in_the_nav():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)

    in_nav = set(walk(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if not p.relative_to(DOCS).parts[0].startswith("_")}
    assert pages - in_nav == set(), "pages missing from the nav of mkdocs.yml"
    assert in_nav - pages == set(), "nav entries without a page"


def test_home_page_shows_the_demo_picture(site, pages):
    images = [url for tag, url in pages[site / "index.html"].links if tag == "img"]
    assert any(url.endswith(".png") and "demo" in url for url in images), images


def test_formulas_are_rendered_without_javascript(site):
    """With latex2mathml (the docs extra) every formula is MathML at build time: no raw TeX is left."""
    if importlib.util.find_spec("latex2mathml") is None:
        pytest.skip("latex2mathml is not installed: formulas are left to MathJax")
    concepts = (site / "concepts" / "index.html").read_text(encoding="utf-8")
    assert concepts.count("<math") >= 10
    assert 'class="arithmatex"' not in concepts
    assert "mathjax" not in concepts.lower()
