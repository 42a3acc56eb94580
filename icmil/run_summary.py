"""The summary of one pipeline run: the per-round metrics table, the final evaluation and the gate's decision.

Written by the pipeline's last task as ``summary.json`` + ``summary.csv`` (one row per round), copied to
``RUN/summary.json|csv`` by ``icmil run`` and logged to the MLflow parent run.

Example:
    >>> import tempfile, json
    >>> p = write_run_summary(tempfile.mkdtemp(), [{"round": 0, "test_auc": 0.8}, {"round": 1, "test_auc": 0.9}],
    ...                       registration={"version": "1", "promote": True, "reason": "first"})
    >>> json.loads(p.read_text())["evaluation"]["test_auc"]
    0.9
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icmil.io import write_json_atomic, write_text_atomic

SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"


def write_run_summary(
    out_dir: str | os.PathLike[str],
    rounds: Sequence[Mapping[str, Any]],
    registration: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``summary.json`` (rounds, evaluation = last round's row, registration) and ``summary.csv``."""
    import pandas as pd

    out = Path(out_dir)
    rows = sorted((dict(r) for r in rounds), key=lambda r: int(r.get("round", 0)))
    data = {
        "rounds": rows,
        "evaluation": rows[-1] if rows else {},
        "registration": dict(registration or {}),
        **dict(extra or {}),
    }
    write_text_atomic(out / SUMMARY_CSV, pd.DataFrame(rows).to_csv(index=False))
    return write_json_atomic(out / SUMMARY_JSON, data)


def read_run_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dict :func:`write_run_summary` wrote (``path``: the file or its folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY_JSON
    data: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
    return data
