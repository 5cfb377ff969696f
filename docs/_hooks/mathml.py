"""mkdocs hook: render the TeX of the pages as MathML at build time (no JavaScript, no CDN).

``pymdownx.arithmatex`` (generic mode) wraps every formula in
``<span class="arithmatex">\\(...\\)</span>`` or ``<div class="arithmatex">\\[...\\]</div>``.
When the pure-Python package ``latex2mathml`` is installed (``pip install latex2mathml``),
this hook replaces each of them by native MathML, which every current browser draws
without help, offline included, and drops the MathJax script from the page. Without
``latex2mathml`` the TeX is left as it is and MathJax (``extra_javascript``) renders it
when the reader is online.

A formula that latex2mathml cannot translate (a TeX command left in the output) is
logged as a warning, so ``mkdocs build --strict`` fails on it instead of showing
``\\command`` to the reader.
"""

from __future__ import annotations

import html
import logging
import re

log = logging.getLogger("mkdocs.hooks.mathml")

try:
    from latex2mathml.converter import convert as _convert
except ImportError:  # pragma: no cover - the MathJax fallback
    _convert = None

_BLOCK = re.compile(r'<div class="arithmatex">\s*\\\[(.*?)\\\]\s*</div>', re.S)
_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
_LEFTOVER = re.compile(r">[^<]*\\[A-Za-z]+[^<]*<")
_MATHJAX = "mathjax"


def on_config(config, **kwargs):
    if _convert is not None:  # MathML needs no script
        config["extra_javascript"] = [js for js in config["extra_javascript"] if _MATHJAX not in str(js).lower()]
    else:
        log.info("latex2mathml is not installed: formulas are left to MathJax (needs internet)")
    return config


def _mathml(tex: str, display: str, page) -> str:
    tex = html.unescape(tex).strip()
    out = _convert(tex, display=display)
    if _LEFTOVER.search(out):
        log.warning("%s: latex2mathml could not translate the formula %r", page.file.src_uri, tex)
    return f'<span class="cmda-math cmda-math-{display}">{out}</span>'


def on_page_content(content, page, **kwargs):
    if _convert is None:
        return content
    content = _BLOCK.sub(lambda m: _mathml(m.group(1), "block", page), content)
    return _INLINE.sub(lambda m: _mathml(m.group(1), "inline", page), content)
