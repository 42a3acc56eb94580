"""The summary of one pipeline run: the per-round metrics table, the final evaluation and the gate's decision.

Written by the pipeline's last task as ``summary.json`` + ``summary.csv`` (one row per round), copied to
``RUN/summary.json|csv`` by ``icmil run`` and put on the MLflow parent run (:func:`log_run_summary`: per-round
metrics, the coupling gain, the gate's decision), so the experiment table compares pipeline runs directly.

Example:
    >>> import tempfile, json
    >>> p = write_run_summary(tempfile.mkdtemp(), [{"round": 0, "test_auc": 0.8}, {"round": 1, "test_auc": 0.9}],
    ...                       registration={"version": "1", "promote": True, "reason": "first"})
    >>> json.loads(p.read_text())["evaluation"]["test_auc"]
    0.9
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmil.io import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from icmil.tracking.base import StageTracker

SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
# The per-round table's columns, in order: what `icmil couple` and `icmil run` print (summary.csv has every metric).
SUMMARY_COLUMNS = (
    "round",
    "teacher_kept",
    "val_auc",
    "test_auc",
    "test_accuracy",
    "test_f1",
    "test_loss",
    "patch_auc_test",
    "patch_auc_all",
    "finetune_best_step",
    "finetune_teacher_val_auc",
    "finetune_selected_val_auc",
)


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


# Metrics whose change from round 0 to the last round is logged as ``gain_<metric>`` (what coupling bought).
GAIN_METRICS = ("val_auc", "test_auc", "test_accuracy", "test_f1", "patch_auc_test", "patch_auc_all")


def per_round_metrics(rounds: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """``{round: {metric: value}}`` with the finite numbers of each round's row (``round`` itself, booleans,
    strings and NaN left out) — the per-round table that the MLflow parent run and ``report.html`` show.

    >>> per_round_metrics([{"round": 1.0, "val_auc": 0.8, "head": "abmil"}, {"round": 0, "val_auc": float("nan")}])
    {0: {}, 1: {'val_auc': 0.8}}
    """
    out: dict[int, dict[str, float]] = {}
    for row in rounds:
        r = int(row.get("round", 0))
        out[r] = {
            str(k): float(v)
            for k, v in row.items()
            if k != "round"
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(float(v))
        }
    return dict(sorted(out.items()))


def parent_run_metrics(rounds: Sequence[Mapping[str, Any]]) -> list[tuple[dict[str, float], int]]:
    """What the pipeline's MLflow parent run carries, as ``(metrics, step)`` batches: every per-round metric as
    the series ``round_<metric>`` (step = round, the same names ``icmil couple`` logs, so the experiment table
    shows the last round's value) and ``gain_<metric>`` = last round - round 0 (step = last round).

    >>> parent_run_metrics([{"round": 0, "test_auc": 0.7}, {"round": 1, "test_auc": 0.8}])
    [({'round_test_auc': 0.7}, 0), ({'round_test_auc': 0.8}, 1), ({'gain_test_auc': 0.1}, 1)]
    """
    table = per_round_metrics(rounds)
    batches = [({f"round_{k}": v for k, v in row.items()}, r) for r, row in table.items() if row]
    if len(table) > 1:
        first, last = table[min(table)], table[max(table)]
        gains = {f"gain_{k}": round(last[k] - first[k], 10) for k in GAIN_METRICS if k in first and k in last}
        if gains:
            batches.append((gains, max(table)))
    return batches


def gate_record(registration: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The promotion gate's decision as parent-run metrics (``gate_promote`` 1/0, ``registered_version``) and
    tags (``icmil.gate.decision``, ``icmil.gate.reason``, ``icmil.model_version``)."""
    if not registration:
        return {}, {}
    promote = bool(registration.get("promote"))
    metrics = {"gate_promote": 1.0 if promote else 0.0}
    tags = {
        "icmil.gate.decision": "promote" if promote else "keep champion",
        "icmil.gate.reason": str(registration.get("reason", ""))[:4000],
    }
    version = registration.get("version")
    if version not in (None, ""):
        tags["icmil.model_version"] = str(version)
        with contextlib.suppress(TypeError, ValueError):
            metrics["registered_version"] = float(version)
    if registration.get("model"):
        tags["icmil.registered_model"] = str(registration["model"])
    return metrics, tags


def log_run_summary(tracker: StageTracker, summary: Mapping[str, Any], files: Sequence[Path] = ()) -> None:
    """Put the run summary on the MLflow parent run: per-round metrics, the gate's decision, and ``files``
    (``summary.json``/``.csv``) as artifacts. With a ``NullTracker`` nothing is recorded."""
    metric_batches = parent_run_metrics(summary.get("rounds", []))
    gate_metrics, gate_tags = gate_record(summary.get("registration", {}))
    with tracker.parent() as run:
        for metrics, step in metric_batches:
            run.log_metrics(metrics, step=step)
        if gate_metrics:
            last = max((step for _, step in metric_batches), default=0)
            run.log_metrics(gate_metrics, step=last)
        if gate_tags:
            run.set_tags(gate_tags)
        for path in files:
            if Path(path).is_file():
                run.log_artifact(path)
