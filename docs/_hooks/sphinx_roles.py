"""mkdocs hook: turn the Sphinx roles of the docstrings into links (or plain code).

The docstrings are Google style but cross-reference with Sphinx roles
(``:class:`~cmda_data.CMDACollate```), which Markdown renders literally as
``:class:CMDACollate``. This hook rewrites each role in the rendered API pages into an
optional mkdocs-autorefs reference to the object's canonical path (found by importing
it), shown as its last name when the role used ``~``. A reference to an object that is
not on the site, or that cannot be resolved (``:meth:`save``` without its class), stays
as plain code: nothing is left for the reader to decode.
"""

from __future__ import annotations

import functools
import html
import importlib
import inspect
import re
from typing import Optional

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>(~?)([A-Za-z_][\w.]*)(\(\))?</code>")
_PACKAGE = "cmda_data"
_SUBMODULES = ("functional", "plan", "mixture", "losses", "aligners", "bank", "dataset", "collate",
               "module", "streaming", "distributed", "datasets", "exceptions")


def _lookup(path: str) -> Optional[str]:
    """The canonical dotted path of the object ``path`` names, or None."""
    parts = path.split(".")
    module = None
    for end in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        break
    if module is None:
        return None
    obj, where = module, module.__name__
    for name in parts[end:]:
        try:
            obj = inspect.getattr_static(obj, name) if inspect.isclass(obj) else getattr(obj, name)
        except AttributeError:
            return None
        owner = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and owner and qualname and owner.startswith(_PACKAGE):
            where = f"{owner}.{qualname}"
        elif inspect.ismodule(obj):
            where = obj.__name__
        else:
            where = f"{where}.{name}"
    return where if where.startswith(_PACKAGE) else None


@functools.lru_cache(maxsize=None)
def _resolve(name: str) -> Optional[str]:
    for candidate in (name, f"{_PACKAGE}.{name}", *(f"{_PACKAGE}.{sub}.{name}" for sub in _SUBMODULES)):
        found = _lookup(candidate)
        if found is not None:
            return found
    return None


def _replace(match: re.Match) -> str:
    tilde, name, call = match.group(1), match.group(2), match.group(3) or ""
    shown = html.escape((name.rsplit(".", 1)[-1] if tilde else name) + call)
    target = _resolve(name)
    if target is None:
        return f"<code>{shown}</code>"
    return f'<autoref identifier="{html.escape(target)}" optional><code>{shown}</code></autoref>'


def on_page_content(content, page, **kwargs):
    return _ROLE.sub(_replace, content)
