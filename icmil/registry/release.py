"""Releasing a run's model with the config's settings: register it as ``challenger``, pre-check it against the
``champion``, and run the promotion gate — the same functions for ``icmil promote`` and the pipeline's register
and promote steps.

Example:
    >>> from icmil.config import load_config
    >>> cfg = load_config(None, ["tracking.promotion_margin=0.02"])
    >>> gate_settings(cfg, tracking_uri="sqlite:///m.db")["margin"]
    0.02
    >>> reg = register_run_model(cfg, "RUN/manifest.csv", "RUN/round_1/encoder", "RUN/round_1/head",
    ...                          "RUN/evaluation", parent_run_id=parent, tracker=tracker)  # doctest: +SKIP
    >>> promotion_step(cfg, tracker)                                                      # doctest: +SKIP
    (True, 'PROMOTED icmil-slide-classifier v1: no champion yet; ...')
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmil.errors import PromotionRejected, TrackingError
from icmil.io import write_json_atomic
from icmil.registry.gate import PromotionResult, promote
from icmil.registry.versions import register_challenger

if TYPE_CHECKING:
    from icmil.config import ICMILConfig
    from icmil.tracking.base import StageTracker

PathLike = str | os.PathLike[str]
REGISTRATION_FILE = "registration.json"


@dataclass
class Registration:
    """What the register step did: the version it created and what the gate's pre-check decided."""

    model: str
    version: str
    promote: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_settings(
    cfg: ICMILConfig, *, tracking_uri: str | None = None, registry_uri: str | None = None
) -> dict[str, Any]:
    """The promotion gate's arguments from ``cfg.tracking`` (URIs: as given, else resolved from the config)."""
    from icmil.tracking import RetryPolicy, resolve_registry_uri, resolve_tracking_uri

    t = cfg.tracking
    return {
        "metric": t.promotion_metric,
        "split": t.promotion_split,
        "margin": t.promotion_margin,
        "floor": t.promotion_floor,
        "tracking_uri": tracking_uri or resolve_tracking_uri(cfg),
        "registry_uri": registry_uri or resolve_registry_uri(cfg),
        "on_data_mismatch": t.on_data_mismatch,
        "retry": RetryPolicy.from_config(t),
    }


def promote_with_config(
    cfg: ICMILConfig,
    *,
    model: str | None = None,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    target_registry_uri: str | None = None,
    dry_run: bool = False,
) -> PromotionResult:
    """Run the gate on ``model`` (default ``tracking.registered_model``) with the config's metric, split, margin,
    floor and retry budget; raises :class:`~icmil.errors.PromotionRejected` when the challenger loses (not in a
    dry run). What ``icmil promote`` runs."""
    return promote(
        model or cfg.tracking.registered_model,
        target_registry_uri=target_registry_uri,
        dry_run=dry_run,
        **gate_settings(cfg, tracking_uri=tracking_uri, registry_uri=registry_uri),
    )


def precheck_promotion(cfg: ICMILConfig) -> tuple[bool, str]:
    """Would the challenger win? The gate's own decision in dry-run mode (changes nothing, never raises a
    rejection; when the champion was scored on other data it answers yes and the real gate re-scores)."""
    result = promote_with_config(cfg, dry_run=True)
    return bool(result.promoted), str(result.reason)


def split_metrics(evaluation: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{"test_auc": 0.9, "val_f1": ...}`` -> ``{"test": {"auc": 0.9}, "val": {"f1": ...}}``.

    >>> split_metrics({"test_auc": 0.9, "val_f1": 0.5, "train_loss": 1.0, "test_n": float("nan")})
    {'test': {'auc': 0.9}, 'val': {'f1': 0.5}}
    """
    out: dict[str, dict[str, float]] = {}
    for key, value in evaluation.items():
        split, _, metric = key.partition("_")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if split in ("val", "test") and metric and numeric and math.isfinite(float(value)):
            out.setdefault(split, {})[metric] = float(value)
    return out


def validation_threshold(
    evaluation_dir: PathLike, head_dir: PathLike, classes: Sequence[str]
) -> dict[str, Any]:
    """The decision threshold for the registered model, chosen on the final round's validation predictions
    (``evaluation/predictions.csv``, else the head's own ``predictions.csv``), with the rule that chose it."""
    import pandas as pd

    from icmil.predict import choose_threshold, default_threshold

    for folder in (evaluation_dir, head_dir):
        path = Path(folder) / "predictions.csv"
        if path.is_file():
            return choose_threshold(pd.read_csv(path), list(classes))
    return default_threshold(
        list(classes), "no validation predictions were found when the model was registered"
    )


def register_run_model(
    cfg: ICMILConfig,
    manifest_csv: PathLike,
    encoder_dir: PathLike,
    head_dir: PathLike,
    evaluation_dir: PathLike,
    *,
    parent_run_id: str,
    tracker: StageTracker,
) -> Registration:
    """Log the slide classifier (encoder + head + settings) under the ``register`` child run, register it as the
    ``challenger`` of ``tracking.registered_model`` with its evaluation (metrics from
    ``evaluation_dir/metrics.json`` and the slides they were computed on), and pre-check it against the champion.

    ``tracker`` must track to MLflow (the model is uploaded to its run): a tracker without runs is an error.
    """
    from icmil.manifest import read_run_manifest
    from icmil.registry.slide_classifier import log_slide_classifier
    from icmil.tracking import RetryPolicy, resolve_registry_uri, resolve_tracking_uri

    evaluation = json.loads((Path(evaluation_dir) / "metrics.json").read_text(encoding="utf-8"))
    manifest = read_run_manifest(cfg, manifest_csv)
    tracking_uri, registry_uri = resolve_tracking_uri(cfg), resolve_registry_uri(cfg)
    retry = RetryPolicy.from_config(cfg.tracking)
    metrics = split_metrics(evaluation)
    tables = {
        split: manifest.split(split)[["slide_id", "path", "label"]]
        for split in metrics
        if not manifest.split(split).empty
    }
    threshold = validation_threshold(evaluation_dir, head_dir, manifest.classes)
    with tracker.stage("register") as run:
        if not run.run_id:
            raise TrackingError(
                "registering a model needs MLflow tracking: the model is stored with the register run "
                "(start a parent run, e.g. icmil run, which tracks by default)"
            )
        model_uri = log_slide_classifier(
            encoder_dir,
            head_dir,
            cfg.tiling,
            manifest.classes,
            run_id=run.run_id,
            tracking_uri=tracking_uri,
            embed_cfg=cfg.embed,
            threshold=threshold,
            retry=retry,
        )
        version = register_challenger(
            model_uri,
            cfg.tracking.registered_model,
            {"icmil.config_digest": cfg.digest()},
            metrics=metrics,
            eval_tables=tables,
            parent_run_id=parent_run_id,
            tracking_uri=tracking_uri,
            registry_uri=registry_uri,
            retry=retry,
        )
        wins, reason = precheck_promotion(cfg)
        run.set_tags({"icmil.model_version": str(version), "icmil.gate_precheck": reason[:4000]})
    return Registration(cfg.tracking.registered_model, str(version), wins, reason)


def write_registration(out_dir: PathLike, registration: Registration) -> dict[str, Any]:
    """Record what was registered and what the gate's pre-check decided (``out_dir/registration.json``)."""
    record = registration.as_dict()
    write_json_atomic(Path(out_dir) / REGISTRATION_FILE, record)
    return record


def read_registration(out_dir: PathLike) -> dict[str, Any]:
    """The record :func:`write_registration` wrote (``model``, ``version``, ``promote``, ``reason``)."""
    data: dict[str, Any] = json.loads((Path(out_dir) / REGISTRATION_FILE).read_text(encoding="utf-8"))
    return data


def promotion_step(cfg: ICMILConfig, tracker: StageTracker) -> tuple[bool, str]:
    """The pipeline's promote step: run the gate (a rejection is an outcome, returned as ``(False, reason)``,
    not an error) and record its final word on the parent run (metric ``gate_promoted`` 1/0, tags
    ``icmil.gate.final`` and ``icmil.gate.final_reason``)."""
    try:
        result = promote_with_config(cfg)
        promoted, reason = bool(result.promoted), str(result)
    except PromotionRejected as err:
        promoted, reason = False, str(err)
    with tracker.parent() as run:
        run.log_metrics({"gate_promoted": 1.0 if promoted else 0.0})
        run.set_tags(
            {
                "icmil.gate.final": "promoted" if promoted else "rejected",
                "icmil.gate.final_reason": reason[:4000],
            }
        )
    return promoted, reason
