"""The shape of the package: library below, recipes above, one door to MLflow, no cycles.

The import graph is read from the source (every ``import``, including those inside functions,
except under ``if TYPE_CHECKING:``), so a lazy import cannot hide an arrow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import aim_platform

PACKAGE = Path(aim_platform.__file__).resolve().parent
LIBRARY = ("models", "data", "train", "eval")
# What a library package may not import: the layers above it, and its siblings where both
# sides need a third thing. Files every layer reads live below all of them: URLs in
# ``aim_platform.storage``, the trunk file (train writes, eval reads) and the codebook file in
# ``models``. So models never import data, and eval never imports train.
FORBIDDEN = {
    "models": {"data", "train", "eval", "jobs", "cli", "submit", "tracking", "services", "bench"},
    "data": {"train", "eval", "jobs", "cli", "submit", "tracking", "services", "bench"},
    "train": {"eval", "jobs", "cli", "submit", "services", "bench"},
    "eval": {"train", "jobs", "cli", "submit", "services", "bench"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[str]:
    """Every imported module name, skipping ``if TYPE_CHECKING:`` blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(internal edges module -> modules, external top-level packages per module)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    internal: dict[str, set[str]] = {m: set() for m in modules}
    external: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for imported in _imports(ast.parse(path.read_text())):
            if imported.split(".")[0] != "aim_platform":
                external[name].add(imported.split(".")[0])
                continue
            target = imported
            while target and target not in modules:  # `from pkg import name` -> pkg
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                internal[name].add(target)
    return internal, external


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def _top(module: str) -> str:
    """``aim_platform.eval.probe`` -> ``eval``; ``aim_platform.cli`` -> ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles_between_modules_or_library_packages() -> None:
    internal, _ = _graph()
    assert _cycles(internal) == []
    packages: dict[str, set[str]] = {}
    for source, targets in internal.items():
        for target in targets:
            if _top(source) in LIBRARY and _top(target) in LIBRARY and _top(source) != _top(target):
                packages.setdefault(_top(source), set()).add(_top(target))
    assert _cycles(packages) == [], packages


def test_library_never_imports_the_layers_above_it() -> None:
    internal, _ = _graph()
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in internal.items()
        for target in targets
        if _top(source) in FORBIDDEN and _top(target) in FORBIDDEN[_top(source)]
    )
    assert upward == []


def test_mlflow_only_in_tracking_and_ray_never_in_models() -> None:
    _, external = _graph()
    assert sorted(m for m, ext in external.items() if "mlflow" in ext) == ["aim_platform.tracking"]
    assert [m for m, ext in external.items() if "ray" in ext and _top(m) == "models"] == []


def test_config_and_the_size_registry_load_without_torch() -> None:
    code = (
        "import sys, aim_platform.config, aim_platform.models.sizes; "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_the_graph_reader_sees_lazy_imports_and_skips_type_checking() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from aim_platform.jobs import x\n"
        "def f():\n    import mlflow\n    from aim_platform.eval.probe import y\n"
    )
    found = _imports(tree)
    assert "mlflow" in found and "aim_platform.eval.probe" in found
    assert not any(name.startswith("aim_platform.jobs") for name in found)
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_a_long_module_says_why_at_its_top() -> None:
    """Small modules: one over 400 lines carries the reason in its docstring."""
    unexplained = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Over 400 lines on purpose" not in doc:
                unexplained.append(_module_name(path))
    assert unexplained == []
