"""Tracking: the stage-logging interface every stage logs through, and its MLflow implementation.

* :mod:`~icmil.tracking.base` — :class:`StageTracker` / :class:`StageRun` (what a stage may log) and
  :class:`NullTracker`.
* :mod:`~icmil.tracking.mlflow_tracker` — :class:`MlflowTracker`: one parent run per pipeline run, a child run
  per round and stage, outage spooling; ``start_parent_run`` / ``end_parent_run`` / ``tracker_for``, and
  ``parent_run`` (both ends in one process, for ``icmil couple``).
* :mod:`~icmil.tracking.uris` and :mod:`~icmil.tracking.retry` — where the stores are, and the retry budget.

The registered model, its versions and the promotion gate are :mod:`icmil.registry`, which builds on this
package. Importing this package is cheap (MLflow loads on first use).

Example:
    >>> from icmil.tracking import NullTracker, redact_uri
    >>> redact_uri("postgresql://u:pw@db/x")
    'postgresql://***@db/x'
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from icmil.tracking.base import NullTracker, StageRun, StageTracker
from icmil.tracking.mlflow_tracker import (
    MlflowTracker,
    end_parent_run,
    parent_run,
    start_parent_run,
    tracker_for,
)
from icmil.tracking.retry import RetryPolicy
from icmil.tracking.uris import redact_uri, resolve_registry_uri, resolve_tracking_uri


def __getattr__(name: str) -> Any:
    # The registry's names used to live here: still reachable (with a DeprecationWarning) so existing scripts run.
    registry = importlib.import_module("icmil.registry")
    if name in registry.__all__:
        warnings.warn(
            f"icmil.tracking.{name} moved to icmil.registry.{name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(registry, name)
    raise AttributeError(f"module 'icmil.tracking' has no attribute {name!r}")


__all__ = [
    "MlflowTracker",
    "NullTracker",
    "RetryPolicy",
    "StageRun",
    "StageTracker",
    "end_parent_run",
    "parent_run",
    "redact_uri",
    "resolve_registry_uri",
    "resolve_tracking_uri",
    "start_parent_run",
    "tracker_for",
]
