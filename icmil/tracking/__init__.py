"""MLflow tracking: run hierarchy, slide-classifier model, registry aliases and the promotion gate.

Importing this package is cheap; the model module (MLflow pyfunc, torch) loads on first use of its names.

Example:
    >>> from icmil.tracking import NullTracker, redact_uri
    >>> redact_uri("postgresql://u:pw@db/x")
    'postgresql://***@db/x'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from icmil.tracking.base import NullTracker, StageRun, StageTracker
from icmil.tracking.mlflow_tracker import (
    MlflowTracker,
    end_parent_run,
    start_parent_run,
    tracker_for,
)
from icmil.tracking.registry import (
    PromotionResult,
    evaluation_digest,
    promote,
    register_challenger,
)
from icmil.tracking.retry import RetryPolicy
from icmil.tracking.uris import redact_uri, resolve_registry_uri, resolve_tracking_uri

if TYPE_CHECKING:
    from icmil.tracking.slide_classifier import (
        SlideClassifier,
        log_slide_classifier,
        open_slide_classifier,
        predict_slides,
        save_slide_classifier,
    )

_LAZY = {
    "SlideClassifier": "icmil.tracking.slide_classifier",
    "log_slide_classifier": "icmil.tracking.slide_classifier",
    "open_slide_classifier": "icmil.tracking.slide_classifier",
    "predict_slides": "icmil.tracking.slide_classifier",
    "save_slide_classifier": "icmil.tracking.slide_classifier",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'icmil.tracking' has no attribute {name!r}")


__all__ = [
    "MlflowTracker",
    "NullTracker",
    "PromotionResult",
    "RetryPolicy",
    "SlideClassifier",
    "StageRun",
    "StageTracker",
    "end_parent_run",
    "evaluation_digest",
    "log_slide_classifier",
    "open_slide_classifier",
    "predict_slides",
    "promote",
    "redact_uri",
    "register_challenger",
    "resolve_registry_uri",
    "resolve_tracking_uri",
    "save_slide_classifier",
    "start_parent_run",
    "tracker_for",
]
