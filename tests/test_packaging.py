"""What `pip install .` installs: every package of the library, and the Kubeflow layer under icmil_kfp only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("components", "pipelines")


def _setuptools() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]
    return data


def test_every_package_folder_is_installed_and_nothing_generic() -> None:
    config = _setuptools()
    listed = set(config["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "icmil").rglob("__init__.py")}
    assert found <= listed, (
        f"add these packages to [tool.setuptools] packages in pyproject.toml: {found - listed}"
    )
    mapped = config["package-dir"]
    assert mapped == {"icmil_kfp.components": "components", "icmil_kfp.pipelines": "pipelines"}
    assert not [p for p in listed if p.split(".")[0] in GENERIC]


def test_nothing_imports_the_kfp_layer_by_its_folder_name() -> None:
    # The repository root is on sys.path in tests, so `import components` would work here and fail once installed.
    stale = []
    for folder in ("icmil", "components", "pipelines", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and not node.level
                    else []
                )
                stale += [
                    f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] in GENERIC
                ]
    assert not stale, f"import icmil_kfp.components / icmil_kfp.pipelines instead: {stale}"


def test_the_installed_names_resolve_to_the_folders() -> None:
    import icmil_kfp.components._runtime as runtime
    import icmil_kfp.pipelines.runner as runner

    assert Path(runtime.__file__).parent == ROOT / "components"
    assert Path(runner.__file__).parent == ROOT / "pipelines"
