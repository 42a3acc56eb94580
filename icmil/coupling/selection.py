"""How stage 2 judges a candidate encoder (step 0 = the teacher itself): the selection signals.

* ``val`` — the round's FROZEN bag head scores the re-embedded validation slides (:func:`score_val`): AUC, then
  :func:`separation` (a shift/scale-invariant correlation of slide log-odds with the labels). Cheap, but it
  measures how far the candidate's features moved away from what that head was trained on as much as how good
  they are.
* ``cv`` (default) — a freshly trained bag head, cross-validated over the re-embedded train + val slides
  (:func:`score_cv`, :mod:`icmil.mil.crossval`): AUC, then lower loss. It asks what the retrained head of the
  next stage can make of the candidate, on five times as many slides as the validation split alone.

Example:
    >>> selection_key({"cv_auc": 0.9, "cv_loss": 0.4}, "cv") > selection_key({"cv_auc": 0.9, "cv_loss": 0.5}, "cv")
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from icmil.config import ICMILConfig
from icmil.mil.base import MILHead


@torch.no_grad()
def separation(labels: np.ndarray, logits: np.ndarray) -> float:
    """How well slide log-odds separate the classes, invariant to any shift or scale of the logits: the
    point-biserial correlation between "is class c" and ``logit_c − logsumexp(other logits)``, averaged over
    classes (one class for binary). In [−1, 1]; NaN with a single class.

    >>> round(separation(np.array([0, 0, 1, 1]), np.array([[0, -1], [0, -2], [0, 1], [0, 3]])), 3)
    0.911
    """
    y = np.asarray(labels)
    z = np.asarray(logits, dtype=float)
    if len(np.unique(y)) < 2:
        return float("nan")
    classes = [1] if z.shape[1] == 2 else list(range(z.shape[1]))
    values = []
    for c in classes:
        others = np.delete(z, c, axis=1)
        log_odds = z[:, c] - np.logaddexp.reduce(others, axis=1)
        is_c = (y == c).astype(float)
        if is_c.std() == 0:
            continue
        sd = log_odds.std()
        values.append(0.0 if sd < 1e-12 else float(np.corrcoef(is_c, log_odds)[0, 1]))
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def score_val(
    head: MILHead, features: Mapping[str, np.ndarray], labels: Mapping[str, int], device: torch.device
) -> dict[str, float]:
    """Slide-level validation signal of ``features`` under the frozen bag ``head``: AUC (one-vs-rest macro for
    more than two classes; NaN with a single class), :func:`separation` of the slide log-odds, and the mean
    cross-entropy (reported, not used for selection: a head scoring features it was not trained on is
    miscalibrated by any uniform shift of those features, which says nothing about their ranking)."""
    from sklearn.metrics import roc_auc_score

    head.eval()
    logits_all, ys, losses = [], [], []
    # DTFD and friends draw random pseudo-bags in training only, but fix the RNG anyway: selection must be
    # a deterministic function of the encoder.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for sid, feats in features.items():
            out = head(torch.from_numpy(feats).to(device))
            logits = out.logits.float().view(1, -1)
            y = torch.tensor([int(labels[sid])], device=logits.device)
            losses.append(float(F.cross_entropy(logits, y)))
            logits_all.append(logits[0].cpu().numpy())
            ys.append(int(labels[sid]))
    z = np.stack(logits_all) if logits_all else np.zeros((0, 2))
    p = torch.from_numpy(z).softmax(-1).numpy()
    y_arr = np.asarray(ys)
    auc = float("nan")
    if len(np.unique(y_arr)) >= 2:
        if p.shape[1] == 2:
            auc = float(roc_auc_score(y_arr, p[:, 1]))
        else:
            auc = float(roc_auc_score(y_arr, p, multi_class="ovr", labels=list(range(p.shape[1]))))
    return {
        "val_auc": auc,
        "val_separation": separation(y_arr, z),
        "val_loss": float(np.mean(losses)) if losses else float("nan"),
        "val_slides": len(ys),
    }


def selection_key(metrics: Mapping[str, float], selection: str = "val") -> tuple[float, float]:
    """Bigger is better; NaN counts as worst. ``val``: (frozen-head val AUC, val separation); ``cv``:
    (cross-validated AUC of a refit head, minus its cross-validated loss)."""

    def val(k: str, sign: float = 1.0) -> float:
        v = metrics.get(k, float("nan"))
        return -math.inf if v is None or math.isnan(v) else sign * float(v)

    if selection == "cv":
        return (val("cv_auc"), val("cv_loss", -1.0))
    return (val("val_auc"), val("val_separation"))


SELECTION_METRICS = ("val_auc", "val_separation", "val_loss", "cv_auc", "cv_loss")


def loggable(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in SELECTION_METRICS if k in metrics}


def describe(metrics: Mapping[str, float]) -> str:
    text = (
        f"frozen-head val AUC {metrics['val_auc']:.4f}, separation {metrics['val_separation']:.4f}, "
        f"loss {metrics['val_loss']:.4f} ({int(metrics['val_slides'])} slides)"
    )
    if "cv_auc" in metrics:
        text += f"; refit-head CV AUC {metrics['cv_auc']:.4f}, loss {metrics['cv_loss']:.4f}"
    return text


def score_cv(
    features: Mapping[str, np.ndarray], labels: Mapping[str, int], cfg: ICMILConfig, n_classes: int
) -> dict[str, float]:
    """Cross-validated AUC and loss of a bag head trained afresh on ``features`` (train + val slides): what
    the retrained head of the next stage can make of an encoder (:mod:`icmil.mil.crossval`).

    The judge is ``coupling.cv_head`` (default AB-MIL; ``null`` = the round's own head) with the ``mil``
    section's other settings. A stable, fast learner makes a low-noise judge: DTFD-MIL at its lr 1e-4 is still
    learning after 20 epochs, and its refits on the same features differed by up to 0.27 test AUC between two
    seeds on the real-image benchmark (docs/coupling.md), while features that serve AB-MIL served DTFD-MIL too.
    """
    from icmil.mil.crossval import crossval_score

    judge = cfg.mil if cfg.coupling.cv_head is None else judge_config(cfg)
    ids = sorted(features)
    bags = [torch.from_numpy(np.ascontiguousarray(features[i], dtype=np.float32)) for i in ids]
    res = crossval_score(
        bags,
        [int(labels[i]) for i in ids],
        judge,
        n_classes,
        folds=cfg.coupling.cv_folds,
        epochs=cfg.coupling.cv_epochs,
        seed=cfg.coupling.seed,
    )
    return {"cv_auc": res.auc, "cv_loss": res.loss, "cv_slides": float(len(ids))}


def judge_config(cfg: ICMILConfig) -> Any:
    """The ``mil`` section with the judge head (``coupling.cv_head``) and that head's own default lr."""
    return cfg.mil.model_copy(update={"head": cfg.coupling.cv_head, "lr": None})
