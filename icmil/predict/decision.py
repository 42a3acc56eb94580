"""How a slide's class is decided from its probabilities, and how the threshold was chosen.

The threshold on the positive-class probability (binary models) is chosen ONCE, on the validation split,
when the model is registered (:func:`choose_threshold`), and stored in the model with the rule that chose it.
Prediction applies it (:func:`decide`) and writes both into each slide's ``prediction.json``.

Example:
    >>> import pandas as pd
    >>> val = pd.DataFrame({"split": ["val"] * 4, "label_index": [0, 0, 1, 1],
    ...                     "prob_normal": [.9, .7, .4, .2], "prob_tumor": [.1, .3, .6, .8]})
    >>> t = choose_threshold(val, ["normal", "tumor"])
    >>> t["rule"], t["value"], t["positive_class"]
    ('youden', 0.6, 'tumor')
    >>> decide([0.35, 0.65], ["normal", "tumor"], t)
    'tumor'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_THRESHOLD = 0.5


def default_threshold(classes: Sequence[str], why: str) -> dict[str, Any]:
    """The rule used when no validation-chosen threshold exists (``why`` says why)."""
    if len(classes) != 2:
        return {"rule": "argmax", "value": None, "description": "the class with the highest probability"}
    return {
        "rule": "default",
        "value": DEFAULT_THRESHOLD,
        "positive_class": str(classes[1]),
        "description": f"p({classes[1]}) >= 0.5; {why}",
    }


def choose_threshold(predictions: pd.DataFrame, classes: Sequence[str], split: str = "val") -> dict[str, Any]:
    """The decision threshold chosen on ``split`` predictions (``split, label_index, prob_<class>`` columns).

    Binary: Youden's J (TPR - FPR) maximised over the validation slides (:func:`icmil.mil.metrics.youden_threshold`).
    Falls back to 0.5 (rule ``default``) when the split is missing or holds one class only; more than two
    classes: ``argmax``.
    """
    if len(classes) != 2:
        return default_threshold(classes, "")
    rows = predictions[predictions["split"].astype(str) == split] if "split" in predictions else predictions
    col = f"prob_{classes[1]}"
    if rows.empty or col not in rows or "label_index" not in rows:
        return default_threshold(classes, f"no {split} predictions to choose a threshold on")
    y = rows["label_index"].astype(int).to_numpy()
    if len(np.unique(y)) < 2:
        return default_threshold(classes, f"the {split} split holds one class only ({len(rows)} slides)")
    from icmil.mil.metrics import youden_threshold

    value = youden_threshold(y, rows[col].astype(float).to_numpy())
    return {
        "rule": "youden",
        "value": round(float(value), 6),
        "positive_class": str(classes[1]),
        "split": split,
        "n_slides": len(rows),
        "description": f"p({classes[1]}) >= threshold; threshold maximises Youden's J (TPR - FPR) on the "
        f"{len(rows)} {split} slides",
    }


def threshold_from_settings(value: Any, classes: Sequence[str]) -> dict[str, Any]:
    """The stored decision rule; models saved before rules were stored kept only a number (or nothing)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (int, float)) and len(classes) == 2:
        return {
            "rule": "stored",
            "value": float(value),
            "positive_class": str(classes[1]),
            "description": f"p({classes[1]}) >= {float(value):g} (stored without its rule)",
        }
    return default_threshold(classes, "the model stores no threshold")


def decide(probs: Sequence[float] | np.ndarray, classes: Sequence[str], threshold: Mapping[str, Any]) -> str:
    """The predicted class: ``p(positive) >= threshold`` for binary models, the most probable class otherwise."""
    p = np.asarray(probs, dtype=float)
    if len(classes) == 2 and threshold.get("value") is not None:
        return str(classes[int(p[1] >= float(threshold["value"]))])
    return str(classes[int(np.argmax(p))])
