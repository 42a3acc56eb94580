"""The tracking interface every stage logs through, so stages never import MLflow directly.

``icmil.tracking.mlflow_tracker.MlflowTracker`` implements it on MLflow; :class:`NullTracker` is the
no-tracking implementation (a library user calling a stage from a notebook without a tracking server).

Example:
    >>> tracker = NullTracker()
    >>> with tracker.stage("train", round_index=0) as run:
    ...     run.log_metrics({"val_auc": 0.9}, step=1)
    >>> tracker.nested("a-tune-run-id") is tracker
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol


class StageRun(Protocol):
    """One tracked stage (an MLflow child run)."""

    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class StageTracker(Protocol):
    """Opens a tracked child run per stage (and round) under one parent run."""

    def stage(
        self, name: str, round_index: int | None = None, tags: Mapping[str, str] | None = None
    ) -> contextlib.AbstractContextManager[StageRun]: ...

    def parent(self) -> contextlib.AbstractContextManager[StageRun]:
        """The parent run itself, for pipeline-level records (per-round test metrics, the summary table)."""
        ...

    def nested(self, run_id: str) -> StageTracker:
        """A tracker whose stages are child runs of ``run_id`` (a run of this tracker, e.g. a round's ``tune``
        run whose trials nest under it); trackers that keep no runs return themselves."""
        ...


class _NullRun:
    run_id = ""

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        return None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        return None

    def set_tags(self, tags: Mapping[str, str]) -> None:
        return None


class NullTracker:
    """Tracks nothing: every call succeeds and records nothing."""

    @contextlib.contextmanager
    def stage(
        self, name: str, round_index: int | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[StageRun]:
        yield _NullRun()

    @contextlib.contextmanager
    def parent(self) -> Iterator[StageRun]:
        yield _NullRun()

    def nested(self, run_id: str) -> StageTracker:
        return self
