"""Slide- and patch-level metrics: AUC, accuracy, F1, balanced accuracy, Youden threshold, bootstrap CI.

Binary problems score the probability of class 1; multi-class problems use macro one-vs-rest AUC and
macro F1 with argmax predictions. A threshold is only ever *chosen* on validation data
(:func:`youden_threshold`) and then *applied* elsewhere (``classification_metrics(..., threshold=t)``).

Example:
    >>> import numpy as np
    >>> y = np.array([0, 0, 1, 1])
    >>> p = np.array([[0.9, 0.1], [0.6, 0.4], [0.35, 0.65], [0.2, 0.8]])
    >>> m = classification_metrics(y, p)
    >>> m["auc"], m["accuracy"], m["balanced_accuracy"]
    (1.0, 1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_curve

# Metrics are plain numpy: sklearn's per-call argument validation costs milliseconds, which adds up over
# per-epoch validation and 1000 bootstrap resamples. Tests check these against sklearn.


def _binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann–Whitney statistic (ties count one half); NaN with a single class."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")  # AUC is undefined with one class; callers see NaN, JSON sees null
    ranks = rankdata(np.asarray(score, dtype=float))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(y == pred)) if len(y) else float("nan")


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y``."""
    if not len(y):
        return float("nan")
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def _f1(y: np.ndarray, pred: np.ndarray, positive: int) -> float:
    tp = int(np.sum((pred == positive) & (y == positive)))
    fp = int(np.sum((pred == positive) & (y != positive)))
    fn = int(np.sum((pred != positive) & (y == positive)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _f1_score(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Binary: F1 of class 1. Multi-class: macro F1 over the classes that occur in ``y`` or ``pred``."""
    if not len(y):
        return float("nan")
    if n_classes == 2:
        return _f1(y, pred, 1)
    present = np.union1d(np.unique(y), np.unique(pred))
    return float(np.mean([_f1(y, pred, int(c)) for c in present]))


def multiclass_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC over the classes that have both positives and negatives in ``y_true``.

    Binary (2 columns): the AUC of column 1. NaN when no class can be scored.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=float)
    if p.shape[1] == 2:
        return _binary_auc(y, p[:, 1])
    aucs = [_binary_auc((y == c).astype(int), p[:, c]) for c in range(p.shape[1])]
    aucs = [a for a in aucs if a == a]
    return float(np.mean(aucs)) if aucs else float("nan")


def youden_threshold(y_true: np.ndarray, positive_probs: np.ndarray) -> float:
    """Threshold on the class-1 probability maximising Youden's J (TPR - FPR); 0.5 if undefined.

    Use it on VALIDATION predictions only; apply the result to test predictions.
    """
    y = np.asarray(y_true).astype(int)
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, np.asarray(positive_probs, dtype=float))
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thresholds[best], 0.0), 1.0))  # roc_curve's first threshold is +inf


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, threshold: float | None = None
) -> dict[str, float]:
    """AUC, accuracy, F1 and balanced accuracy of slide probabilities ``probs (n, C)`` against ``y_true``.

    Predictions are ``p1 >= 0.5`` for two classes (argmax otherwise). With ``threshold`` (binary only) the
    ``*_at_threshold`` metrics use ``p1 >= threshold`` as well.

    >>> classification_metrics([0, 1, 1], np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]), threshold=0.3)["accuracy_at_threshold"]
    1.0
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probs must be (n, C) with n = len(y_true) = {len(y)}, got {p.shape}")
    n_classes = p.shape[1]
    binary = n_classes == 2
    pred = (p[:, 1] >= 0.5).astype(int) if binary else p.argmax(axis=1)
    out: dict[str, float] = {
        "n": float(len(y)),
        "auc": multiclass_auc(y, p),
        "accuracy": _accuracy(y, pred),
        "f1": _f1_score(y, pred, n_classes),
        "balanced_accuracy": _balanced_accuracy(y, pred),
    }
    if threshold is not None and binary:
        tpred = (p[:, 1] >= threshold).astype(int)
        out.update(
            threshold=float(threshold),
            accuracy_at_threshold=_accuracy(y, tpred),
            f1_at_threshold=_f1_score(y, tpred, 2),
            balanced_accuracy_at_threshold=_balanced_accuracy(y, tpred),
        )
    return out


def bootstrap_auc_ci(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` CI of the (macro) AUC, resampling slides with replacement.

    Resamples that lack a class are skipped (they have no AUC). ``(nan, nan)`` when fewer than
    10 % of the resamples could be scored (e.g. a single-class test set) or ``n_boot`` is 0.

    >>> y = np.array([0, 1] * 20); p = np.stack([1 - y * 0.6, y * 0.6], 1)
    >>> bootstrap_auc_ci(y, p, n_boot=50)
    (1.0, 1.0)
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=float)
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        a = multiclass_auc(y[idx], p[idx])
        if a == a:
            aucs.append(a)
    if n_boot == 0 or len(aucs) < max(1, n_boot // 10):
        return float("nan"), float("nan")
    lo, hi = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def patch_in_lesion(
    coords: np.ndarray,
    patch_size_level0: float,
    lesion_boxes: Sequence[Sequence[float]],
    min_fraction: float = 0.5,
) -> np.ndarray:
    """Whether at least ``min_fraction`` of each patch's area lies inside the union of the lesion boxes.

    ``coords`` are level-0 top-left corners ``(N, 2)``; boxes are level-0 ``[x0, y0, x1, y1]``. A patch
    inside one box is scored exactly; a patch touching several boxes is scored on a 16 x 16 point grid so
    overlapping boxes are not double counted.
    """
    xy = np.asarray(coords, dtype=float).reshape(-1, 2)
    out = np.zeros(len(xy), dtype=bool)
    boxes = np.asarray(lesion_boxes, dtype=float).reshape(-1, 4)
    if not len(xy) or not len(boxes):
        return out
    s = float(patch_size_level0)
    x0, y0 = xy[:, :1], xy[:, 1:]
    ix = np.clip(np.minimum(x0 + s, boxes[:, 2]) - np.maximum(x0, boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(y0 + s, boxes[:, 3]) - np.maximum(y0, boxes[:, 1]), 0, None)
    frac = ix * iy / (s * s)  # (N, B)
    out = frac.max(axis=1) >= min_fraction
    several = ((frac > 0).sum(axis=1) > 1) & ~out
    if several.any():
        g = (np.arange(16) + 0.5) / 16 * s
        px = (xy[several, 0][:, None, None] + g[None, None, :]).repeat(16, axis=1)  # (M, 16, 16) x
        py = (xy[several, 1][:, None, None] + g[None, :, None]).repeat(16, axis=2)  # (M, 16, 16) y
        inside = np.zeros(px.shape, dtype=bool)
        for bx0, by0, bx1, by1 in boxes:
            inside |= (px >= bx0) & (px < bx1) & (py >= by0) & (py < by1)
        out[several] = inside.mean(axis=(1, 2)) >= min_fraction
    return out


def patch_level_auc(
    instance_scores: Mapping[str, np.ndarray],
    coords: Mapping[str, np.ndarray],
    patch_size_level0: float | Mapping[str, float],
    lesion_boxes: Mapping[str, Sequence[Sequence[float]]],
) -> float:
    """AUC of per-patch scores against "≥ 50 % of the patch lies inside a lesion box", pooled over slides.

    All arguments are keyed by slide id; ``patch_size_level0`` may be one number or one per slide. Slides
    without an entry in ``lesion_boxes`` are skipped (unknown ground truth); an empty list means a lesion-free
    slide (all its patches are negatives). NaN if the pooled patches hold only one class.

    >>> s = {"a": np.array([0.9, 0.1]), "b": np.array([0.2])}
    >>> c = {"a": np.array([[0, 0], [512, 0]]), "b": np.array([[0, 0]])}
    >>> patch_level_auc(s, c, 256, {"a": [[0, 0, 256, 256]], "b": []})
    1.0
    """
    ys, ss = [], []
    for slide_id, scores in instance_scores.items():
        if slide_id not in lesion_boxes:
            continue
        size = patch_size_level0[slide_id] if isinstance(patch_size_level0, Mapping) else patch_size_level0
        xy = np.asarray(coords[slide_id])
        sc = np.asarray(scores, dtype=float).reshape(-1)
        if len(sc) != len(xy):
            raise ValueError(f"slide {slide_id!r}: {len(sc)} scores but {len(xy)} coordinates")
        ys.append(patch_in_lesion(xy, size, lesion_boxes[slide_id]))
        ss.append(sc)
    if not ys:
        return float("nan")
    return _binary_auc(np.concatenate(ys).astype(int), np.concatenate(ss))
