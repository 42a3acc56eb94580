"""Scoring slides with a trained head: slide probabilities, per-instance scores, and split-level metrics.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> from icmil.features import write_features
    >>> from icmil.manifest import read_manifest
    >>> from icmil.mil import create_mil_head
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> rows = []
    >>> for i in range(4):
    ...     _ = write_features(d / f"s{i}.h5", np.random.rand(5, 8).astype("float32"), np.zeros((5, 2), int), {})
    ...     rows.append(f"s{i},s{i}.tif,{['normal', 'tumor'][i % 2]},test")
    >>> _ = (d / "m.csv").write_text("slide_id,path,label,split\\n" + "\\n".join(rows) + "\\n")
    >>> head = create_mil_head("abmil", 8, 2, hidden_dim=4, attention_dim=4)
    >>> metrics, preds = evaluate_mil_head(head, read_manifest(d / "m.csv"), d, "test")
    >>> len(preds), sorted(preds.columns)[:3], metrics["n"]
    (4, ['label', 'label_index', 'predicted'], 4.0)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from icmil.errors import ManifestError
from icmil.log import get_logger
from icmil.manifest import Manifest, read_manifest
from icmil.mil.base import MILHead
from icmil.mil.data import BagStore, patch_size_level0
from icmil.mil.metrics import classification_metrics

log = get_logger("mil.evaluate")


@dataclass
class InstanceScores:
    """Per-patch outputs of one slide, kept for heatmaps and patch-level AUC."""

    coords: np.ndarray
    patch_size_level0: float
    attention: np.ndarray | None  # raw attention scores (head.attention_scores), None if the head has none
    positive_prob: np.ndarray  # instance-teacher probability of "not class 0"


@dataclass
class Predictions:
    """Slide-level outputs of one pass over some slides."""

    slide_ids: list[str]
    labels: np.ndarray  # (n,) label indices
    probs: np.ndarray  # (n, C)
    losses: np.ndarray  # (n,) cross-entropy of the slide logits
    instances: dict[str, InstanceScores] = field(default_factory=dict)

    @property
    def mean_loss(self) -> float:
        return float(self.losses.mean()) if len(self.losses) else float("nan")


def as_manifest(manifest: Manifest | str | os.PathLike[str]) -> Manifest:
    """Accept a :class:`Manifest` or the path of a resolved manifest CSV."""
    return manifest if isinstance(manifest, Manifest) else read_manifest(manifest)


@torch.no_grad()
def predict_slides(
    head: MILHead,
    store: BagStore,
    slides: pd.DataFrame,
    keep_instances: bool = False,
) -> Predictions:
    """Eval-mode slide probabilities for the rows of ``slides`` (columns ``slide_id``, ``label_index``).

    With ``keep_instances`` the per-patch attention scores and instance probabilities are kept as well
    (one extra pass of the instance teacher per slide, on the bag already in memory).
    """
    was_training = head.training
    head.eval()
    ids, labels, probs, losses = [], [], [], []
    instances: dict[str, InstanceScores] = {}
    try:
        for sid, label in zip(slides["slide_id"], slides["label_index"], strict=True):
            bag = store.load(str(sid))
            out = head(bag.features)
            y = torch.tensor([int(label)])
            ids.append(str(sid))
            labels.append(int(label))
            probs.append(torch.softmax(out.logits, dim=0).numpy())
            losses.append(float(F.cross_entropy(out.logits.unsqueeze(0), y)))
            if keep_instances:
                scores = head.attention_scores(bag.features)
                inst = torch.softmax(head.instance_logits(bag.features), dim=1)
                instances[str(sid)] = InstanceScores(
                    coords=bag.coords,
                    patch_size_level0=patch_size_level0(bag.coords, bag.attrs),
                    attention=None if scores is None else scores.numpy(),
                    positive_prob=(1.0 - inst[:, 0]).numpy(),
                )
    finally:
        head.train(was_training)
    n_classes = head.n_classes
    return Predictions(
        slide_ids=ids,
        labels=np.asarray(labels, dtype=int),
        probs=np.stack(probs) if probs else np.zeros((0, n_classes)),
        losses=np.asarray(losses, dtype=float),
        instances=instances,
    )


def predictions_frame(
    pred: Predictions, split: str, classes: list[str], threshold: float | None = None
) -> pd.DataFrame:
    """One row per slide: ``slide_id, split, label, label_index, prob_<class>..., predicted, predicted_index``.

    Binary predictions use ``p1 >= 0.5`` (and ``predicted_at_threshold`` with a validation threshold).
    """
    df = pd.DataFrame({"slide_id": pred.slide_ids, "split": split})
    df["label_index"] = pred.labels
    df["label"] = [classes[i] for i in pred.labels]
    for c, name in enumerate(classes):
        df[f"prob_{name}"] = pred.probs[:, c] if len(pred.probs) else []
    binary = len(classes) == 2
    idx = (pred.probs[:, 1] >= 0.5).astype(int) if binary else pred.probs.argmax(axis=1)
    df["predicted_index"] = idx
    df["predicted"] = [classes[i] for i in idx]
    if threshold is not None and binary:
        df["predicted_at_threshold"] = [classes[int(p >= threshold)] for p in pred.probs[:, 1]]
    return df


def evaluate_mil_head(
    head: MILHead,
    manifest: Manifest | str | os.PathLike[str],
    features_dir: str | os.PathLike[str],
    split: str,
    threshold: float | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics and per-slide predictions of ``head`` on one split of the manifest.

    Slides whose features file is missing are logged (naming slide and file), listed under
    ``metrics["skipped"]`` and left out. ``threshold`` (binary; choose it on validation data, e.g. from a
    training run's metrics.json) adds the ``*_at_threshold`` metrics.
    """
    m = as_manifest(manifest)
    classes = head.classes or m.classes
    if len(classes) != head.n_classes:
        raise ManifestError(
            f"head predicts {head.n_classes} classes but the manifest has {len(m.classes)} ({m.classes})"
        )
    frame = m.split(split)
    if frame.empty:
        raise ManifestError(f"manifest {m.source or ''} has no slides in split {split!r}")
    store = BagStore(features_dir, cache_size=0)
    skipped = store.unusable(list(frame["slide_id"]))
    for sid, why in skipped.items():
        log.error("slide %r skipped: %s", sid, why)
    frame = frame[~frame["slide_id"].isin(skipped)]
    pred = predict_slides(head, store, frame)
    metrics: dict[str, Any] = classification_metrics(pred.labels, pred.probs, threshold)
    metrics["loss"] = pred.mean_loss
    metrics["skipped"] = skipped
    return metrics, predictions_frame(pred, split, list(classes), threshold)


def predictions_to_csv(frames: list[pd.DataFrame], path: str | os.PathLike[str]) -> Path:
    """Concatenate prediction frames and write them atomically as CSV."""
    from icmil.io import write_text_atomic

    return write_text_atomic(path, pd.concat(frames, ignore_index=True).to_csv(index=False))
