"""Helpers shared by the tracking tests (imported by conftest and test modules alike: one module, one state)."""

from __future__ import annotations

import shutil
from pathlib import Path

from icmil.config import ICMILConfig, load_config

CLASSES = ["normal", "tumor"]
TEMPLATE: dict[str, Path] = {}


def fresh_sqlite(path: Path) -> str:
    """A migrated, empty MLflow sqlite store at ``path`` (a copy of the session template); returns its URI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        shutil.copyfile(TEMPLATE["db"], path)
    return f"sqlite:///{path}"


def make_cfg(run_dir: Path, *overrides: str) -> ICMILConfig:
    """A config on a fresh sqlite store in ``run_dir`` whose tracking retries are fast (no real backoff)."""
    fresh_sqlite(Path(run_dir) / "mlflow.db")
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            "tracking.retries=2",
            "tracking.retry_backoff=0.05",
            "tracking.retry_backoff_max=0.2",
            *overrides,
        ],
    )
