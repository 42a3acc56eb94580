"""MLflow tracking: run hierarchy, slide-classifier model, registry aliases and the promotion gate."""

from icmil.tracking.base import NullTracker, StageRun, StageTracker
from icmil.tracking.mlflow_tracker import (
    MlflowTracker,
    end_parent_run,
    start_parent_run,
    tracker_for,
)
from icmil.tracking.retry import RetryPolicy
from icmil.tracking.uris import redact_uri, resolve_registry_uri, resolve_tracking_uri

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "RetryPolicy",
    "StageRun",
    "StageTracker",
    "end_parent_run",
    "redact_uri",
    "resolve_registry_uri",
    "resolve_tracking_uri",
    "start_parent_run",
    "tracker_for",
]
