"""Read what a finished (or partly finished) run left in its folder, for the report.

Two layouts hold the same things: ``icmil couple`` writes ``RUN/round_k/{encoder,features,head}``; ``icmil run``
writes every task's outputs under ``RUN/kfp/<pipeline run>/<task>/<output>`` (indexed in ``RUN/outputs.json``).
Both write ``RUN/summary.json`` as ``{rounds, evaluation, registration, rounds_planned}``; runs made by
``icmil couple`` before it shared that format hold a list of rows, which is read too. Each stage leaves a ``stage*.json`` marker naming its stage and round, which is how outputs
are matched to rounds here, whatever the task names.

Example:
    >>> contents = collect_run("runs/demo")  # doctest: +SKIP
    >>> [r["round"] for r in contents.rounds], sorted(contents.heads)  # doctest: +SKIP
    ([0, 1], [0, 1])
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icmil.errors import ConfigError
from icmil.log import get_logger

log = get_logger("report")

# Files a promotion decision may be written to (first found wins), besides summary.json's "registration".
DECISION_FILES = ("promotion.json", "promotion_decision.json", "registration.json")


@dataclass
class RunContents:
    """Everything the report shows, as paths and plain data (missing parts stay empty)."""

    run_dir: Path
    rounds: list[dict[str, Any]] = field(default_factory=list)
    registration: dict[str, Any] = field(default_factory=dict)
    heads: dict[int, Path] = field(
        default_factory=dict
    )  # round -> bag-head folder (metrics.json, roc.png, ...)
    features: dict[int, list[Path]] = field(default_factory=dict)  # round -> feature folders (shards)
    encoders: dict[int, Path] = field(default_factory=dict)  # round -> encoder folder (config.json)
    tuning: dict[int, Path] = field(default_factory=dict)  # round -> folder with best_params.json + plots
    manifest: Path | None = None
    config: Path | None = None
    rounds_planned: int | None = None  # coupling.rounds of the run (summary.json); None when not recorded
    pipeline_dir: Path | None = None  # icmil run: RUN/kfp/<pipeline run>

    @property
    def final_round(self) -> int | None:
        return max(self.heads) if self.heads else None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        log.warning("report: %s not readable (%s); left out", path, err)
        return None


def _number(value: Any) -> Any:
    """Round indices arrive as floats from KFP collections (0.0): make them ints, keep everything else."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _summary(run: Path) -> Any:
    summary = run / "summary.json"
    return _json(summary) if summary.is_file() else None


def _rows(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-round rows, registration) from summary.json (either layout), else summary.csv, else
    round_k/metrics.json."""
    data = _summary(run)
    rows: list[dict[str, Any]] = []
    registration: dict[str, Any] = {}
    if isinstance(data, dict):
        rows = [dict(r) for r in data.get("rounds", []) if isinstance(r, dict)]
        registration = dict(data.get("registration") or {})
    elif isinstance(data, list):
        rows = [dict(r) for r in data if isinstance(r, dict)]
    if not rows and (run / "summary.csv").is_file():
        import pandas as pd

        rows = pd.read_csv(run / "summary.csv").to_dict("records")
    if not rows:
        for marker in sorted(run.glob("round_*/metrics.json")):
            m = _json(marker)
            if isinstance(m, dict):
                rows.append(m)
    clean = []
    for r in rows:
        row = {k: _number(v) for k, v in r.items()}
        if isinstance(row.get("round"), int):
            clean.append(row)
    return sorted(clean, key=lambda r: int(r["round"])), registration


def _pipeline_dir(run: Path) -> Path | None:
    outputs = run / "outputs.json"
    if outputs.is_file():
        data = _json(outputs)
        if isinstance(data, dict) and data.get("pipeline_run_dir"):
            p = Path(str(data["pipeline_run_dir"]))
            if p.is_dir():
                return p
    kfp = run / "kfp"
    if kfp.is_dir():
        runs = [p for p in kfp.iterdir() if p.is_dir()]
        if runs:
            return max(runs, key=lambda p: p.stat().st_mtime)
    return None


def _markers(root: Path) -> list[tuple[dict[str, Any], Path]]:
    """(marker, folder) of every stage marker under ``root``."""
    found = []
    for path in sorted(root.rglob("stage*.json")):
        data = _json(path)
        if isinstance(data, dict) and "stage" in data:
            found.append((data, path.parent))
    return found


def collect_run(run_dir: str | os.PathLike[str]) -> RunContents:
    """Find the summary, promotion decision, per-round heads / features / encoders / tuning outputs, the
    resolved manifest and config of the run in ``run_dir``. Raises :class:`ConfigError` when the folder holds
    no run at all."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"run folder not found: {run}")
    rows, registration = _rows(run)
    contents = RunContents(run_dir=run, rounds=rows, registration=registration)
    summary = _summary(run)
    if isinstance(summary, dict) and isinstance(summary.get("rounds_planned"), int):
        contents.rounds_planned = int(summary["rounds_planned"])
    contents.config = run / "config.yaml" if (run / "config.yaml").is_file() else None
    contents.pipeline_dir = _pipeline_dir(run)
    roots = [contents.pipeline_dir] if contents.pipeline_dir else [p for p in sorted(run.glob("round_*"))]
    for root in roots:
        for marker, folder in _markers(root):
            k = _number(marker.get("round"))
            stage = marker.get("stage")
            if not isinstance(k, int):
                continue
            if stage == "train" and (folder / "metrics.json").is_file():
                contents.heads[k] = folder
            elif stage == "embed":
                contents.features.setdefault(k, []).append(folder)
            elif stage in ("encoder", "finetune") and (folder / "config.json").is_file():
                contents.encoders[k] = folder
    search = contents.pipeline_dir or run
    for best in sorted(search.rglob("best_params.json")):
        data = _json(best)
        if isinstance(data, dict) and isinstance(_number(data.get("round")), int):
            contents.tuning.setdefault(int(_number(data["round"])), best.parent)
    if not registration:
        contents.registration = _decision(run, contents.pipeline_dir)
    from icmil.cohort import MANIFEST_NAME

    for candidate in (
        run / MANIFEST_NAME,
        *(sorted(contents.pipeline_dir.glob(f"*/cohort/{MANIFEST_NAME}")) if contents.pipeline_dir else []),
    ):
        if candidate.is_file():
            contents.manifest = candidate
            break
    if not (contents.rounds or contents.heads):
        raise ConfigError(
            f"{run} holds no finished round (no summary.json, no round_k/metrics.json, no trained head): "
            "run `icmil couple` or `icmil run` first"
        )
    return contents


def _decision(run: Path, pipeline_dir: Path | None) -> dict[str, Any]:
    for name in DECISION_FILES:
        candidates = [run / name]
        if pipeline_dir is not None:
            candidates += sorted(pipeline_dir.rglob(name))
        for path in candidates:
            if path.is_file():
                data = _json(path)
                if isinstance(data, dict):
                    return data
    return {}
