"""No import cycles among the project's modules: the layers point one way (library -> components -> pipelines).

Read from the source (AST), not by importing: every ``import`` / ``from ... import`` counts, at module level or
inside a function (a lazy import still ties two files together), except those under ``if TYPE_CHECKING:``.
Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` when the importer is not inside ``a.b`` already, so
that package counts as a dependency too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package name it is installed as.
PACKAGES = {"icmil": "icmil", "components": "icmil_kfp.components", "pipelines": "icmil_kfp.pipelines"}
# Cycles that exist today and are being removed elsewhere; each entry must still be a cycle (so it is deleted
# from here once fixed).
KNOWN_CYCLES: list[frozenset[str]] = []


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only
    ]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: the project modules it imports}``, package ``__init__``s entered on the way included."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in modules)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules:
                    targets.add(full)
                elif base in modules:
                    targets.add(base)
        own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1 + is_package)}
        entered = {
            ".".join(t.split(".")[:k])
            for t in targets
            for k in range(1, t.count(".") + 1)
            if ".".join(t.split(".")[:k]) in modules
        }
        graph[name] = (targets | (entered - own)) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan), i.e. every import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_project_has_no_import_cycles() -> None:
    found = cycles(import_graph(project_modules()))
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, f"import cycle(s) among the project's modules: {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"known cycle(s) no longer exist: delete them from KNOWN_CYCLES: {gone}"


def test_the_checker_finds_a_cycle(tmp_path: Path) -> None:
    # A lazy import inside a function and a package __init__ entered on the way both close a cycle.
    pkg = tmp_path / "icmil"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from icmil.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from icmil import a\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from icmil import c\n"
    )
    (pkg / "c.py").write_text("import icmil.a\n")
    modules = {k: v for k, v in project_modules(tmp_path).items() if k.startswith("icmil")}
    assert cycles(import_graph(modules)) == []
    (pkg / "a.py").write_text("from icmil.sub.b import f\n")
    assert cycles(import_graph(modules)) == [frozenset({"icmil.a", "icmil.sub", "icmil.sub.b"})]


def test_the_graph_sees_lazy_imports_and_no_tracker_type_checks() -> None:
    graph = import_graph(project_modules())
    assert "icmil.registry.slide_classifier" in graph["icmil.registry.gate"]  # imported inside a function
    # Trials nest under the tune run through StageTracker.nested, not by checking for MLflow's tracker class.
    assert "icmil.tracking.mlflow_tracker" not in graph["icmil.tuning.worker"]
    # Tracking (runs) never depends on the registry (models); the registry builds on tracking.
    tracking = {m for m in graph if m.startswith("icmil.tracking") and m != "icmil.tracking.slide_classifier"}
    assert not {t for m in tracking for t in graph[m] if t.startswith("icmil.registry")}
