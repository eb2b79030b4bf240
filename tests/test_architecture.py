"""The shape of the package: library below, recipes above, one door to MLflow, no cycles.

The import graph is read from the source (every ``import``, including those inside functions,
except under ``if TYPE_CHECKING:``), so a lazy import cannot hide an arrow.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import aim_platform

PACKAGE = Path(aim_platform.__file__).resolve().parent
PROJECT = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())
# Imported only where the feature is used, and installed by the extra that names it (boto3
# through moto, which requires it; see pyproject.toml).
OPTIONAL = {"dev-s3": {"moto", "boto3"}}
EXTRA_PROVIDES = {"moto": {"boto3"}}
# A distribution that provides another's modules: infra/pillow_simd.sh swaps Pillow-SIMD in.
PROVIDES = {"pillow-simd": "pillow"}
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
    mlflow_users = [m for m, ext in external.items() if "mlflow" in ext]
    assert mlflow_users and all(m.startswith("aim_platform.tracking.") for m in mlflow_users)
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


def _requirement_names(requirements: list[str]) -> set[str]:
    """``["ray[data]==2.60.0", ...]`` -> ``{"ray", ...}`` (normalized distribution names)."""
    return {
        re.split(r"[\[<>=!~;\s]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements
    }


def test_every_imported_package_is_declared() -> None:
    """`pip install aim-platform` gets what the package imports: each third-party import is a
    declared dependency, not something that happens to arrive with another one."""
    from importlib.metadata import packages_distributions

    core = _requirement_names(PROJECT["project"]["dependencies"])
    extras = {
        k: _requirement_names(v) for k, v in PROJECT["project"]["optional-dependencies"].items()
    }
    optional = set().union(*OPTIONAL.values())
    providers = packages_distributions()
    _, external = _graph()
    undeclared = set()
    for module, names in external.items():
        for name in names - set(sys.stdlib_module_names) - optional:
            dists = {d.lower().replace("_", "-") for d in providers.get(name, [])}
            dists |= {PROVIDES[d] for d in dists if d in PROVIDES}
            if not dists & core:
                undeclared.add(f"{module}: {name} ({', '.join(sorted(dists)) or 'not installed'})")
    assert sorted(undeclared) == []
    for extra, names in OPTIONAL.items():
        installed = extras[extra].union(*(EXTRA_PROVIDES.get(d, set()) for d in extras[extra]))
        assert names <= installed, f"extra {extra} lacks {names - installed}"
    from importlib.metadata import requires

    moto_needs = _requirement_names([r for r in requires("moto") or [] if "extra" not in r])
    assert EXTRA_PROVIDES["moto"] <= moto_needs


def test_requires_python_is_what_the_tests_need() -> None:
    """The oldest Python claimed is one the code and the tests run on: they read TOML with
    tomllib (3.11), and ruff checks the code for that same version."""
    claimed = PROJECT["project"]["requires-python"]
    major, minor = map(int, re.fullmatch(r">=\s*(\d+)\.(\d+)", claimed).groups())
    sources = [*PACKAGE.rglob("*.py"), *Path(__file__).parent.rglob("*.py")]
    if any("tomllib" in _imports(ast.parse(p.read_text())) for p in sources):
        assert (major, minor) >= (3, 11), f"requires-python {claimed}, but tomllib needs 3.11"
    assert PROJECT["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    assert sys.version_info >= (major, minor)


def test_what_torchtrainer_is_handed_imports_neither_torch_nor_ray() -> None:
    """Ray Train's controller unpickles the entry point and its LoopArgs: importing their
    module must not pull torch and DCP into that process (about 2 s of CPU at every start
    of training); the workers import the loop when they run it."""
    import subprocess
    import sys

    code = "import sys, aim_platform.train.entry; "
    code += (
        "print(sorted(m for m in ('torch', 'ray', 'aim_platform.train.loop') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
