"""The package's shape: no import cycle between its files, and the core modules' functions fit on a screen.

Both checks read the source with :mod:`ast` (nothing is imported), so they see every import a reader sees:
module-level, inside functions, under ``if TYPE_CHECKING:``. The graph and the statement counts are computed here,
independently of the tool that lists them for people (``../shared/tools/import_cycles.py``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "medcam3d"

#: the modules whose functions must stay short (issue 13: the explainer loop, the certificate, the pipeline and
#: the evaluation suite), and the limit (the style guide: a function fits on a screen)
SHORT_FUNCTION_FILES = ("explainer.py", "certificate.py", "pipeline.py", "evaluate/*.py")
MAX_STATEMENTS = 60


# --- the import graph ------------------------------------------------------------------------------------------------
def module_name(path: Path, root: Path) -> str:
    """``medcam3d/models/loading.py`` -> ``medcam3d.models.loading``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, me: str, is_package: bool) -> Iterator[str]:
    """Every dotted name an import statement anywhere in ``tree`` may load, relative imports made absolute:
    ``from .x import y`` in ``a.b`` gives ``a.x`` and ``a.x.y`` (``y`` may be a submodule)."""
    package = me if is_package else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)


def import_graph(root: Path) -> tuple[dict[str, set[str]], set[str]]:
    """``({module: modules it imports}, package names)`` over the ``.py`` files under ``root``.

    Importing a package (its ``__init__``) counts as importing what that ``__init__`` imports, so that
    ``from .models import build_model`` is an edge to ``models/loading.py``; an ``__init__``'s own re-exports are
    not edges of a cycle (the package is not a node), as in ``import_cycles.py``."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    direct: dict[str, set[str]] = {}
    for me, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        direct[me] = {n for n in imported_names(tree, me, me in packages) if n in files and n != me}

    def expand(module: str, seen: set[str]) -> set[str]:
        """``module`` itself, or for a package the modules its ``__init__`` (transitively) imports."""
        if module not in packages:
            return {module}
        if module in seen:
            return set()
        seen.add(module)
        return set().union(*(expand(m, seen) for m in direct[module])) if direct[module] else set()

    graph = {
        me: set().union(*(expand(t, set()) for t in targets)) - {me} if targets else set()
        for me, targets in direct.items()
        if me not in packages
    }
    return graph, packages


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


# --- statement counts ------------------------------------------------------------------------------------------------
def statement_count(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Statements in ``function``'s body at any depth (a docstring counts), a nested function or class counting as
    one statement (its own body is counted when it is checked itself)."""
    count = 0
    pending: list[ast.stmt] = list(function.body)
    while pending:
        node = pending.pop()
        count += 1
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                pending.append(child)
            elif isinstance(child, (ast.excepthandler, ast.match_case)):
                pending.extend(child.body)
    return count


def long_functions(path: Path, limit: int = MAX_STATEMENTS) -> list[str]:
    """``"name (line L): N statements"`` for each function or method in ``path`` with more than ``limit``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        f"{node.name} (line {node.lineno}): {n} statements"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (n := statement_count(node)) > limit
    ]


def short_function_files() -> list[Path]:
    return sorted(p for pattern in SHORT_FUNCTION_FILES for p in PACKAGE_DIR.glob(pattern))


# --- the checks on hand-written sources (the helpers above are the test's own instruments) -------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_import_graph_sees_local_relative_and_package_imports(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "__init__.py": "from .a import f\n",
        "a.py": "def f():\n    from .sub.b import g  # hidden in a function\n    return g\n",
        "sub/__init__.py": "from .c import h\n",
        "sub/b.py": "import pkg.sub\n",
        "sub/c.py": "from ..a import f\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
    })
    graph, packages = import_graph(root)
    assert packages == {"pkg", "pkg.sub"}
    assert graph == {
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub.b": {"pkg.sub.c"},  # importing the package = what its __init__ imports
        "pkg.sub.c": {"pkg.a"},
        "pkg.d": {"pkg.a"},
    }
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]


def test_cycles_on_hand_made_graphs() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    two = cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}})
    assert sorted(two) == [["a", "b"], ["c", "d"]]


def test_statement_count_by_hand(tmp_path: Path) -> None:
    source = (
        "def f(x):\n"
        '    """doc"""\n'  # 1
        "    y = 0\n"  # 2
        "    for i in range(x):\n"  # 3
        "        if i:\n"  # 4
        "            y += i\n"  # 5
        "        else:\n"
        "            pass\n"  # 6
        "    try:\n"  # 7
        "        y = 1 / y\n"  # 8
        "    except ZeroDivisionError:\n"
        "        y = 0\n"  # 9
        "    def g():\n"  # 10 (its body is g's own)
        "        return 1\n"
        "        return 2\n"
        "    return y\n"  # 11
    )
    path = tmp_path / "m.py"
    path.write_text(source)
    functions = {n.name: n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    assert statement_count(functions["f"]) == 11
    assert statement_count(functions["g"]) == 2
    assert long_functions(path, limit=10) == ["f (line 1): 11 statements"]
    assert long_functions(path, limit=11) == []


# --- the package ---------------------------------------------------------------------------------------------------
def test_no_import_cycles() -> None:
    graph, _ = import_graph(PACKAGE_DIR)
    assert "medcam3d.config" in graph and "medcam3d.models.loading" in graph["medcam3d.config"]
    found = cycles(graph)
    assert not found, "import cycles (function-local imports included): " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("path", short_function_files(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_core_functions_fit_on_a_screen(path: Path) -> None:
    assert not long_functions(path), f"functions over {MAX_STATEMENTS} statements in {path.name}: " + "; ".join(
        long_functions(path)
    )
