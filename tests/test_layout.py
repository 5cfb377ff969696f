"""The package layout: no import circle, imports at the top, layers that import downwards only.

Read from the source with ``ast`` (nothing is imported), so a circle hidden by an import inside
a function is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cmda_data"
#: optional dependencies: the only imports allowed inside functions
OPTIONAL = {"transformers", "open_clip", "webdataset", "datasets", "matplotlib", "tqdm", "PIL", "scipy"}
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: Dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name a ``from ... import`` refers to (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> List[tuple]:
    """``(imported module, line, inside a function)`` for every import statement of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, path, child)
                for alias in child.names:  # `from pkg import submodule` imports the submodule
                    full = f"{target}.{alias.name}"
                    out.append((full if full in MODULES else target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return out


def _graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {name: set() for name in MODULES}
    for module in MODULES:
        own_parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        for target, _, _ in imports_of(module):
            parts = target.split(".")
            # the imported module and the packages Python imports on the way to it
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name in MODULES and name != module and name not in own_parents:
                    graph[module].add(name)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as ``[a, b, ..., a]``, or ``[]``."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def dfs(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_resolve_relative_imports():
    assert "cmda_data.core.build" in [t for t, _, _ in imports_of("cmda_data.bank._plan")]
    assert "cmda_data.core.functional" in [t for t, _, _ in imports_of("cmda_data.core.plan")]


def test_no_import_circle_among_cmda_data_modules():
    cycle = find_cycle(_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_optional_dependencies_are_imported_inside_functions(module):
    late = [(target, line) for target, line, inside in imports_of(module) if inside]
    bad = [f"line {line}: {target}" for target, line in late if target.split(".")[0] not in OPTIONAL]
    assert not bad, f"{module} imports inside functions (move them to the top): {bad}"


def test_core_imports_nothing_else_of_the_package():
    for module in MODULES:
        if module.startswith("cmda_data.core"):
            for target, line, _ in imports_of(module):
                if target.startswith("cmda_data.") and not target.startswith(("cmda_data.core", "cmda_data.exceptions")):
                    pytest.fail(f"{module} line {line} imports {target}: core/ must stand alone")


def test_nothing_imports_the_demo_or_the_cli():
    for module in MODULES:
        if module.startswith(("cmda_data.demo", "cmda_data.cli", "cmda_data.__main__")):
            continue
        for target, line, _ in imports_of(module):
            assert not target.startswith(("cmda_data.demo", "cmda_data.cli")), f"{module} line {line}: {target}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_file_over_500_lines(module):
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines"
