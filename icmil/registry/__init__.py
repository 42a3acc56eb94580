"""The model registry and serving side: the registered slide classifier, its versions, and the promotion gate.

* :mod:`~icmil.registry.slide_classifier` — the model: a slim bundle (encoder + bag head + settings + the
  contract a slide must meet) inside an MLflow pyfunc folder; ``open_slide_classifier`` / ``predict_slides``.
* :mod:`~icmil.registry.versions` — ``register_challenger``: a new version with alias ``challenger``, its
  lineage and evaluation as tags.
* :mod:`~icmil.registry.gate` — ``promote``: the gate that moves ``champion``.
* :mod:`~icmil.registry.release` — the same steps with the config's settings, for ``icmil promote`` and the
  pipeline's register / promote components.

Runs and their metrics (the stage-logging interface, MLflow's run tree) are :mod:`icmil.tracking`; this package
builds on it, never the other way round. Importing it is cheap: the model module (MLflow pyfunc, torch) loads
on first use of its names.

Example:
    >>> from icmil.registry import CHAMPION, evaluation_digest
    >>> CHAMPION
    'champion'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from icmil.registry.gate import PromotionResult, promote
from icmil.registry.release import (
    Registration,
    gate_settings,
    precheck_promotion,
    promote_with_config,
    promotion_step,
    read_registration,
    register_run_model,
    write_registration,
)
from icmil.registry.versions import CHALLENGER, CHAMPION, evaluation_digest, register_challenger

if TYPE_CHECKING:
    from icmil.registry.slide_classifier import (
        SlideClassifier,
        log_slide_classifier,
        open_slide_classifier,
        predict_slides,
        run_predictions,
        save_slide_classifier,
    )

_LAZY = {
    name: "icmil.registry.slide_classifier"
    for name in (
        "SlideClassifier",
        "log_slide_classifier",
        "open_slide_classifier",
        "predict_slides",
        "run_predictions",
        "save_slide_classifier",
    )
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'icmil.registry' has no attribute {name!r}")


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PromotionResult",
    "Registration",
    "SlideClassifier",
    "evaluation_digest",
    "gate_settings",
    "log_slide_classifier",
    "open_slide_classifier",
    "precheck_promotion",
    "predict_slides",
    "promote",
    "promote_with_config",
    "promotion_step",
    "read_registration",
    "register_challenger",
    "register_run_model",
    "run_predictions",
    "save_slide_classifier",
    "write_registration",
]
