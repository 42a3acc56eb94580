"""Files ``icmil predict`` writes besides the table: ``run_metadata.json`` (what ran, with which versions and
arguments) and each slide's ``prediction.json``.

Example:
    >>> import tempfile, json
    >>> p = write_run_metadata(tempfile.mkdtemp(), {"model": "models:/m@champion", "slides": ["a.svs"]})
    >>> sorted(json.loads(p.read_text()))[:3]
    ['arguments', 'created_at', 'git_commit']
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from icmil.io import write_json_atomic
from icmil.redact import redact_data

RUN_METADATA = "run_metadata.json"
PREDICTION_JSON = "prediction.json"
# Packages whose versions decide what a prediction is (the model code, the numerics, the slide reader).
VERSIONED = (
    "icmil",
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "openslide-python",
    "openslide-bin",
    "mlflow",
    "h5py",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a prediction depends on (None when one is missing)."""
    out: dict[str, str | None] = {}
    for dist in VERSIONED:
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    return out


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_run_metadata(
    out_dir: str | os.PathLike[str],
    arguments: Mapping[str, Any],
    model: Mapping[str, Any] | None = None,
    slides: Sequence[str] | None = None,
) -> Path:
    """``out_dir/run_metadata.json``: package versions, git commit, Python, host, the arguments as given
    (redacted), the slides they expanded to, and the model that predicted."""
    from icmil.tracking.mlflow_tracker import git_commit

    record = {
        "created_at": now_utc(),
        "arguments": redact_data(dict(arguments)),
        "slides": redact_data(list(slides or [])),
        "model": redact_data(dict(model or {})),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "working_directory": str(Path.cwd()),
    }
    return write_json_atomic(Path(out_dir) / RUN_METADATA, record)


def write_prediction_json(folder: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """``folder/prediction.json`` (credentials in any URI it holds are redacted)."""
    return write_json_atomic(Path(folder) / PREDICTION_JSON, redact_data(dict(record)))
