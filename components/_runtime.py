"""Plumbing shared by component bodies at run time (inside the task's process, never at compile time).

Component bodies are copied into a temporary module by KFP, so everything they share lives here, in the
installed ``icmil_kfp.components`` package (this folder): picking the tracker, giving a stage one folder that
holds the outputs of every shard, the cohort artifact's layout, and turning results into KFP metadata. (A body
reads its config with :func:`icmil.config.config_from_yaml`.)

Example:
    >>> append_round("", 0, {"val_auc": 0.7})
    '[{"round": 0, "val_auc": 0.7}]'
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from icmil.config import ICMILConfig
from icmil.nested import flatten
from icmil.tracking.base import NullTracker, StageTracker


def stage_tracker(cfg: ICMILConfig, parent_run_id: str) -> StageTracker:
    """MLflow child runs under the pipeline's parent run; no tracking when there is no parent run id."""
    if not parent_run_id:
        return NullTracker()
    from icmil.tracking import tracker_for

    return tracker_for(cfg, parent_run_id)  # type: ignore[no-any-return]


@contextlib.contextmanager
def merged_view(paths: Sequence[str]) -> Iterator[Path]:
    """A temporary folder of symlinks to the files of several shard artifacts (no copy), removed afterwards."""
    from icmil.cohort import merge_shard_dirs

    with tempfile.TemporaryDirectory(prefix="icmil-view-") as tmp:
        yield merge_shard_dirs(list(paths), tmp, link=True)


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary folder for files a stage needs but that are not outputs (a shard's manifest)."""
    with tempfile.TemporaryDirectory(prefix="icmil-scratch-") as tmp:
        yield Path(tmp)


def append_round(history_json: str, round_index: int, metrics: Mapping[str, Any]) -> str:
    """The per-round metrics table threaded through the rounds as a small JSON parameter, plus one row.

    >>> append_round(append_round("", 0, {"val_auc": 0.7}), 1, {"val_auc": 0.8})
    '[{"round": 0, "val_auc": 0.7}, {"round": 1, "val_auc": 0.8}]'
    """
    rows = json.loads(history_json) if history_json else []
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
    rows = [r for r in rows if r.get("round") != round_index]
    rows.append({"round": round_index, **numeric})
    return json.dumps(sorted(rows, key=lambda r: r["round"]))


def close_parent_run(cfg: ICMILConfig, kfp_run_id: str, state: str, error: str = "") -> str:
    """End the parent run opened for ``kfp_run_id``: FINISHED if KFP reports SUCCEEDED, else FAILED."""
    from icmil.tracking import end_parent_run, start_parent_run

    # resume=True finds the run by its run key (the KFP run id) instead of creating one.
    tags = {"icmil.kfp_final_state": state, **({"icmil.kfp_error": error[:4000]} if error else {})}
    run_id = start_parent_run(cfg, kfp_run_id=kfp_run_id, tags=tags, resume=True)
    status = "FINISHED" if state == "SUCCEEDED" else "FAILED"
    end_parent_run(cfg, run_id, status=status)
    return status


def cohort_manifest(cohort_dir: str) -> str:
    """The resolved manifest inside the cohort artifact (its relative slide paths resolve against it)."""
    from icmil.cohort import MANIFEST_NAME  # the cohort artifact's layout is icmil.cohort.prepare_cohort's

    return str(Path(cohort_dir) / MANIFEST_NAME)


@contextlib.contextmanager
def shard_inputs(shard_json: str, cohort_dir: str | None) -> Iterator[tuple[str, list[str]]]:
    """The shard's own manifest CSV (temporary) and its slide ids, for a tile/embed stage."""
    from icmil.cohort import Shard, shard_manifest

    shard = Shard.from_json(shard_json)
    with scratch_dir() as tmp:
        path = shard_manifest(shard, tmp / f"shard-{shard.index}.csv", base_dir=cohort_dir)
        yield str(path), shard.slide_ids


def _scalars(data: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar leaves of nested ``data`` (``a.b`` keys), non-finite floats as None, lists left out."""
    return {
        name: value if not isinstance(value, float) or math.isfinite(value) else None
        for name, value in flatten(data).items()
        if isinstance(value, (bool, str, int, float)) or value is None
    }


def metadata(result: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's result as KFP artifact metadata: scalars only (nested dicts flattened, lists dropped)."""
    return {k: v for k, v in _scalars(result).items() if not (isinstance(v, str) and len(v) > 500)}


def log_kfp_metrics(metrics: Any, result: Mapping[str, Any]) -> dict[str, float]:
    """Log the finite numbers of ``result`` (nested ``metrics`` flattened) to a KFP ``Metrics`` artifact;
    return them (the row of the per-round table)."""
    row: dict[str, float] = {}
    for key, value in _scalars(result).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = key[len("metrics.") :] if key.startswith("metrics.") else key
        row[name] = float(value)
        metrics.log_metric(name, float(value))
    return row


def round_outputs(
    cfg: ICMILConfig, metrics: Any, history_json: str, round_index: int, result: Mapping[str, Any]
) -> Any:
    """What an evaluate or keep-teacher task returns: the per-round table plus this round's row
    (:func:`icmil.run_summary.summary_row`, the row ``icmil couple`` writes too) and the promotion metric
    (``tracking.promotion_split`` + ``tracking.promotion_metric``); the round's numbers also go to ``metrics``."""
    from collections import namedtuple

    from icmil.run_summary import summary_row

    log_kfp_metrics(metrics, result)
    row = summary_row(result)
    key = f"{cfg.tracking.promotion_split}_{cfg.tracking.promotion_metric}"
    outputs = namedtuple("EvaluateOutputs", ["history_json", "metric"])  # type: ignore[name-match]
    return outputs(append_round(history_json, round_index, row), float(row.get(key, float("nan"))))


def tuned_params(best_dir: str | None) -> dict[str, Any] | None:
    """The tuned ``mil`` settings from the round's ``best_params.json`` folder, None without tuning."""
    if best_dir is None:
        return None
    from icmil.tuning import load_best_params

    return load_best_params(best_dir)


def log_summary_to_parent(
    cfg: ICMILConfig, parent_run_id: str, summary: Mapping[str, Any], paths: Sequence[Path]
) -> None:
    """The run summary on the MLflow parent run: per-round metrics, the gate's decision, the summary files."""
    from icmil.run_summary import log_run_summary

    log_run_summary(stage_tracker(cfg, parent_run_id), summary, paths)
