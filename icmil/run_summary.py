"""The summary of one run: the per-round metrics table, the final evaluation and the gate's decision.

ONE format for both ways of running ICMIL: ``icmil couple`` (:func:`icmil.rounds.run_rounds`) and the
pipeline's report task both call :func:`write_run_summary`, which writes ``summary.json`` (``{rounds,
evaluation, registration, ...}``; ``registration`` is empty for ``icmil couple``, which registers nothing),
``summary.csv`` (one row per round, every metric) and ``summary.png`` (AUCs by round). A round's row is
:func:`summary_row` of its evaluation record, so a round whose stage 2 kept the teacher says ``teacher_kept``
and ``reused_from_round`` in both. :func:`log_run_summary` puts the table on the MLflow parent run (per-round
metrics, the coupling gain, the gate's decision), so the experiment table compares runs directly.

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

from icmil.io import atomic_path, write_json_atomic, write_text_atomic
from icmil.nested import flatten

if TYPE_CHECKING:
    import pandas as pd

    from icmil.tracking.base import StageTracker

SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_PNG = "summary.png"
SUMMARY_FILES = (SUMMARY_JSON, SUMMARY_CSV, SUMMARY_PNG)
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
    "finetune_teacher_cv_auc",
    "finetune_selected_cv_auc",
)
# A round's record holds bookkeeping besides metrics; these numbers are not metrics of the round.
_BOOKKEEPING = ("round", "reused_from_round")


def summary_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A round's row of the per-round table, from its evaluation record (what ``evaluate_stage`` or
    ``keep_teacher_stage`` returned / stored in ``metrics.json``): ``round``, ``teacher_kept``,
    ``reused_from_round`` (kept rounds only), then every finite number (nested keys joined by ``_``).

    >>> summary_row({"stage": "evaluate", "round": 1.0, "val_auc": 0.8, "head": "abmil", "test_auc": float("nan")})
    {'round': 1, 'teacher_kept': False, 'val_auc': 0.8}
    >>> summary_row({"round": 2, "teacher_kept": True, "reused_from_round": 1, "val_auc": 0.8})
    {'round': 2, 'teacher_kept': True, 'reused_from_round': 1, 'val_auc': 0.8}
    """
    kept = bool(record.get("teacher_kept", False))
    row: dict[str, Any] = {"round": int(record.get("round") or 0), "teacher_kept": kept}
    if kept and record.get("reused_from_round") is not None:
        row["reused_from_round"] = int(record["reused_from_round"])
    for key, value in flatten(record, sep="_").items():
        if key in _BOOKKEEPING or key in row or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            row[key] = value
    return row


def rounds_table(rounds: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The rows as a table sorted by round: :data:`SUMMARY_COLUMNS` first (those present), then every other
    column in the order first seen (what ``summary.csv`` holds and :func:`icmil.rounds.run_rounds` returns)."""
    import pandas as pd

    rows = sorted((dict(r) for r in rounds), key=lambda r: int(r.get("round", 0)))
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    table["round"] = table["round"].astype(int)
    first = [c for c in SUMMARY_COLUMNS if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


def format_rounds(rounds: Sequence[Mapping[str, Any]]) -> str:
    """The per-round table ``icmil couple`` and ``icmil run`` print (:data:`SUMMARY_COLUMNS`, 4 decimals).

    >>> print(format_rounds([{"round": 0, "teacher_kept": False, "val_auc": 0.7}]))
     round  teacher_kept  val_auc
         0         False   0.7000
    """
    table = rounds_table(rounds)
    cols = [c for c in SUMMARY_COLUMNS if c in table.columns]
    return str(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))


def write_run_summary(
    out_dir: str | os.PathLike[str],
    rounds: Sequence[Mapping[str, Any]],
    registration: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``summary.json`` (rounds, evaluation = last round's row, registration, ``extra``),
    ``summary.csv`` and ``summary.png`` into ``out_dir``; returns the JSON's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted((dict(r) for r in rounds), key=lambda r: int(r.get("round", 0)))
    data = {
        "rounds": rows,
        "evaluation": rows[-1] if rows else {},
        "registration": dict(registration or {}),
        **dict(extra or {}),
    }
    write_text_atomic(out / SUMMARY_CSV, rounds_table(rows).to_csv(index=False))
    plot_rounds(rows, out / SUMMARY_PNG)
    return write_json_atomic(out / SUMMARY_JSON, data)


def plot_rounds(rounds: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """Line plot of slide AUC (val, test) and the instance teacher's patch AUC by round; rounds that kept
    their teacher are drawn as open markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rounds_table(rounds)
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    kept = table["teacher_kept"].fillna(False).astype(bool) if "teacher_kept" in table else None
    for col, label in (
        ("val_auc", "val slide AUC"),
        ("test_auc", "test slide AUC"),
        ("patch_auc_test", "test patch AUC (instance teacher)"),
        ("patch_auc_all", "all-slides patch AUC"),
    ):
        if col in table and table[col].notna().any():
            (line,) = ax.plot(table["round"], table[col].astype(float), marker="o", label=label)
            if kept is not None and kept.any():
                ax.plot(
                    table.loc[kept, "round"],
                    table.loc[kept, col].astype(float),
                    "o",
                    mfc="white",
                    color=line.get_color(),
                )
    ax.set_xlabel("round (0 = before coupling; open markers: teacher kept)")
    ax.set_ylabel("AUC")
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(list(table["round"]) if len(table) else [0])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("ICMIL metrics by round")
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


# Metrics whose change from round 0 to the last round is logged as ``gain_<metric>`` (what coupling bought).
GAIN_METRICS = ("val_auc", "test_auc", "test_accuracy", "test_f1", "patch_auc_test", "patch_auc_all")


def per_round_metrics(rounds: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """``{round: {metric: value}}`` with the finite numbers of each round's row (``round`` itself, other
    booleans, strings and NaN left out; ``teacher_kept`` as 1/0) — the per-round table that the MLflow parent
    run and ``report.html`` show.

    >>> per_round_metrics([{"round": 1.0, "val_auc": 0.8, "head": "abmil", "teacher_kept": True},
    ...                    {"round": 0, "val_auc": float("nan")}])
    {0: {}, 1: {'val_auc': 0.8, 'teacher_kept': 1.0}}
    """
    out: dict[int, dict[str, float]] = {}
    for row in rounds:
        r = int(row.get("round", 0))
        out[r] = {
            str(k): float(v)
            for k, v in row.items()
            if k not in _BOOKKEEPING
            and (k == "teacher_kept" or not isinstance(v, bool))
            and isinstance(v, (int, float))
            and math.isfinite(float(v))
        }
    return dict(sorted(out.items()))


def parent_run_metrics(rounds: Sequence[Mapping[str, Any]]) -> list[tuple[dict[str, float], int]]:
    """What the MLflow parent run of ``icmil run`` and ``icmil couple`` carries, as ``(metrics, step)`` batches:
    every per-round metric as the series ``round_<metric>`` (step = round, so the experiment table shows the
    last round's value) and ``gain_<metric>`` = last round - round 0 (step = last round).

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
