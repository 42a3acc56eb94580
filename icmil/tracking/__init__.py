"""MLflow tracking: run hierarchy, slide-classifier model, registry aliases and the promotion gate."""

from icmil.tracking.base import NullTracker, StageRun, StageTracker

__all__ = ["NullTracker", "StageRun", "StageTracker"]
