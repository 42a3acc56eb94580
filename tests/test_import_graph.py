"""No import cycles among the project's modules: the layers point one way (library -> components -> pipelines).

Read from the source (AST), not by importing: every ``import`` / ``from ... import`` counts, at module level or
inside a function (a lazy import still ties two files together), except those under ``if TYPE_CHECKING:``.
Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` when the importer is not inside ``a.b`` already, so
that package counts as a dependency too.
"""

from __future__ import annotations

import ast
import os
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


# The package-level drawing in docs/architecture.md. The building blocks every package uses are left out of it,
# and so is the old import path of the slide classifier that models registered before icmil.registry existed
# still import (a one-line re-export of icmil.registry.slide_classifier).
BASE = {
    "icmil",
    "icmil.config",
    "icmil.errors",
    "icmil.io",
    "icmil.log",
    "icmil.manifest",
    "icmil.nested",
    "icmil.redact",
    "icmil.slide_ids",
}
COMPAT = {"icmil.tracking.slide_classifier"}
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- import-graph: begin -->", "<!-- import-graph: end -->"


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``{package: the packages it imports}`` (icmil's subpackages and top-level modules, the two KFP
    packages), without :data:`BASE` and :data:`COMPAT`."""
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module in COMPAT or _package(module) in BASE:
            continue
        source = _package(module)
        out.setdefault(source, set()).update(
            _package(t) for t in targets if t not in COMPAT and _package(t) not in BASE | {source}
        )
    return out


def draw(packages: dict[str, set[str]]) -> str:
    """One line per package, dependencies before their users (a topological order; ties alphabetical)."""
    done: list[str] = []
    left = dict(packages)
    while left:
        ready = sorted(p for p, deps in left.items() if deps <= set(done))
        assert ready, f"package-level import cycle among {sorted(left)}"
        done += ready
        for p in ready:
            del left[p]
    short = {p: p.removeprefix("icmil.") for p in done}
    width = max(len(s) for s in short.values())
    return "\n".join(
        f"{short[p]:<{width}} -> {', '.join(short[d] for d in sorted(packages[p])) or '(building blocks only)'}"
        for p in done
    )


def test_architecture_md_draws_the_package_graph_as_it_is() -> None:
    drawing = draw(package_graph(import_graph(project_modules())))
    block = f"{BEGIN}\n```text\n{drawing}\n```\n{END}"
    text = DOC.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    assert start >= 0 and end > start, f"{DOC} has no {BEGIN} ... {END} block"
    current = text[start : end + len(END)]
    if current != block and os.environ.get("ICMIL_UPDATE_DOCS") == "1":
        DOC.write_text(text.replace(current, block), encoding="utf-8")
        current = block
    assert current == block, (
        f"{DOC} draws an outdated import graph (ICMIL_UPDATE_DOCS=1 rewrites it):\n{drawing}"
    )
