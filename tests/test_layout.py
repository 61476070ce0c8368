"""The architecture, checked from the source: the import graph has no circle and no upward
import, only backends/ knows backend names, and the in-job programs import what they may.

Imports are read with `ast` (module level and inside functions alike, `TYPE_CHECKING` blocks
excluded), so a deferred import that closes a circle still counts.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "launcher"

# Lower layers first; a module may import its own layer's modules or lower ones only.
# `cli` sits on top and nothing imports it.
LAYERS: list[tuple[str, ...]] = [
    ("launcher", "launcher.errors", "launcher.spec", "launcher.ports", "launcher.files"),
    ("launcher.schema", "launcher.hardware", "launcher.triage"),
    ("launcher.config", "launcher.runs", "launcher.entrypoint", "launcher.call"),
    (
        "launcher.runtime",
        "launcher.data",
        "launcher.image",
        "launcher.causes",
        "launcher.preflight",
    ),
    ("launcher.backends",),
    ("launcher.doctor",),
    ("launcher.sweep",),
    ("launcher.cli", "launcher.__main__"),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """Every launcher module this file imports (resolving `from pkg import mod`)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for inner in node.body:
                skip.update(id(n) for n in ast.walk(inner))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("launcher"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("launcher"):
                continue
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _exists(candidate) else node.module)
    return found


def _exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        name = _module_name(path)
        graph[name] = {m for m in _imports(path) if m != name}
    return graph


def _layer(module: str) -> int:
    best, best_len = -1, -1
    for index, members in enumerate(LAYERS):
        for member in members:
            if (module == member or module.startswith(member + ".")) and len(member) > best_len:
                best, best_len = index, len(member)
    assert best >= 0, f"{module} has no layer in tests/test_layout.py"
    return best


def test_the_import_graph_has_no_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{mod} ({_layer(mod)}) imports {dep} ({_layer(dep)})"
        for mod, deps in _graph().items()
        for dep in deps
        if dep in _graph() and _layer(dep) > _layer(mod)
    ]
    assert not upward, "\n".join(upward)


def test_nothing_imports_the_cli() -> None:
    users = [m for m, deps in _graph().items() if "launcher.cli" in deps]
    users.remove("launcher.__main__")  # `python -m launcher`
    assert not users


def test_only_backends_know_backend_names() -> None:
    names = "|".join(("local", "docker", "slurm"))
    pattern = re.compile(rf"""backend\s*(==|!=|\bin\b)\s*\(?["']({names})["']""")
    offenders = []
    for path in PKG.rglob("*.py"):
        if (PKG / "backends") in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_runtime_imports_nothing_from_the_submit_side() -> None:
    submit_side = ("launcher.backends", "launcher.sweep", "launcher.cli", "launcher.image")
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in _graph().items()
        if mod.startswith("launcher.runtime")
        for dep in deps
        if dep.startswith(submit_side)
    ]
    assert not bad, "\n".join(bad)


def test_the_slurm_package_init_imports_nothing() -> None:
    """rank.py runs in bare containers: importing the package must not pull submitit in."""
    tree = ast.parse((PKG / "backends" / "slurm" / "__init__.py").read_text())
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
