"""Registered versions: each pipeline run registers a ``challenger`` version carrying its lineage and evaluation.

Aliases only (stages are deprecated). A version carries its lineage and evaluation as tags:
``icmil.parent_run_id``, ``icmil.metric.<split>.<metric>``, ``icmil.data_digest.<split>`` (which slides and
labels the metrics were computed on) and ``icmil.eval_table.<split>`` (where that table is stored), so the
promotion gate (:mod:`icmil.registry.gate`) can tell whether two versions were scored on the same data.

Example:
    >>> version = register_challenger("runs:/abc/slide_classifier", "icmil", metrics={"test": {"auc": 0.9}},
    ...                               eval_tables={"test": test_slides_df})          # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from icmil.errors import TrackingError
from icmil.io import text_digest
from icmil.log import get_logger
from icmil.registry.sources import clients, parse_runs_uri, registry_of, resolve_artifact_source
from icmil.tracking.retry import RetryPolicy
from icmil.tracking.uris import redact_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = get_logger("registry")

CHALLENGER = "challenger"
CHAMPION = "champion"
TAG_PARENT_RUN = "icmil.parent_run_id"
TAG_PROMOTION = "icmil.promotion"
TAG_PROMOTION_REASON = "icmil.promotion.reason"
TAG_PROMOTED_FROM = "icmil.promoted_from"
# Metrics where smaller is better; every other metric (auc, accuracy, f1, ...) is "higher wins".
LOWER_IS_BETTER = frozenset({"loss", "log_loss", "nll", "brier", "ece"})


def metric_tag(split: str, metric: str) -> str:
    return f"icmil.metric.{split}.{metric}"


def digest_tag(split: str) -> str:
    return f"icmil.data_digest.{split}"


def table_tag(split: str) -> str:
    return f"icmil.eval_table.{split}"


def evaluation_digest(table: pd.DataFrame) -> str:
    """Digest of an evaluation table: which slides with which labels (order and paths do not matter).

    >>> evaluation_digest(pd.DataFrame({"slide_id": ["b", "a"], "label": ["t", "n"], "path": ["x", "y"]})) == \\
    ...     evaluation_digest(pd.DataFrame({"slide_id": ["a", "b"], "label": ["n", "t"], "path": ["/p", "/q"]}))
    True
    """
    missing = {"slide_id", "label"} - set(table.columns)
    if missing:
        raise TrackingError(
            f"evaluation table lacks column(s) {sorted(missing)} (needs slide_id, path, label)"
        )
    rows = sorted(zip(table["slide_id"].astype(str), table["label"].astype(str), strict=True))
    return text_digest(rows)


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _store_eval_table(
    client: MlflowClient, run_id: str | None, split: str, table: str | os.PathLike[str] | pd.DataFrame
) -> tuple[str, pd.DataFrame]:
    """Log the evaluation table as an artifact of ``run_id`` (or keep its absolute path); return (uri, table)."""
    df = pd.read_csv(table) if not isinstance(table, pd.DataFrame) else table
    missing = {"slide_id", "path", "label"} - set(df.columns)
    if missing:
        raise TrackingError(f"evaluation table for split {split!r} lacks column(s) {sorted(missing)}")
    df = df[["slide_id", "path", "label"]].copy()
    # Relative paths would mean nothing to the process that re-evaluates from another directory.
    df["path"] = [p if "://" in str(p) else str(Path(str(p)).resolve()) for p in df["path"]]
    if run_id is None:
        if isinstance(table, pd.DataFrame):
            raise TrackingError("an evaluation DataFrame needs a run to be stored in (model_uri runs:/...)")
        return str(Path(table).resolve()), df
    with tempfile.TemporaryDirectory(prefix="icmil-eval-") as tmp:
        path = Path(tmp) / f"{split}.csv"
        df.to_csv(path, index=False)
        client.log_artifact(run_id, str(path), "evaluation")
    return f"runs:/{run_id}/evaluation/{split}.csv", df


def read_eval_table(client: MlflowClient, uri: str) -> pd.DataFrame:
    if uri.startswith("runs:/"):
        run_id, path = parse_runs_uri(uri)
        with tempfile.TemporaryDirectory(prefix="icmil-eval-") as tmp:
            return pd.read_csv(client.download_artifacts(run_id, path, tmp))
    return pd.read_csv(uri)


def register_challenger(
    model_uri: str,
    name: str,
    tags: Mapping[str, str] | None = None,
    *,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    data_digests: Mapping[str, str] | None = None,
    eval_tables: Mapping[str, str | os.PathLike[str] | pd.DataFrame] | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    retry: RetryPolicy | None = None,
) -> str:
    """Register ``model_uri`` as a new version of ``name`` with alias ``challenger``; return the version.

    ``metrics`` is ``{split: {metric: value}}``; ``eval_tables`` ``{split: table}`` (CSV path or DataFrame
    with slide_id, path, label: the slides the metrics were computed on). Each table is stored with the run
    and its digest tagged (``data_digests`` overrides the computed digest), so the gate can tell whether two
    versions were scored on the same data and re-score them on it if not.

    Example:
        >>> register_challenger(info_uri, "icmil-slide-classifier", {"git": "abc"},
        ...                     metrics={"test": {"auc": 0.91}}, eval_tables={"test": "RUN/test.csv"})  # doctest: +SKIP
        '3'
    """
    client = clients(tracking_uri, registry_uri)
    policy = retry or RetryPolicy()
    where = redact_uri(registry_of(client))
    run_id = parse_runs_uri(model_uri)[0] if model_uri.startswith("runs:/") else (parent_run_id or None)
    version_tags: dict[str, str] = {**({TAG_PARENT_RUN: parent_run_id} if parent_run_id else {})}
    for split, values in (metrics or {}).items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                version_tags[metric_tag(split, key)] = repr(float(value))
    for split, table in (eval_tables or {}).items():
        uri, df = policy.call(
            functools.partial(_store_eval_table, client, run_id, split, table),
            f"store the {split} evaluation table at {where}",
        )
        version_tags[table_tag(split)] = uri
        version_tags[digest_tag(split)] = evaluation_digest(df)
    for split, digest in (data_digests or {}).items():
        version_tags[digest_tag(split)] = digest
    version_tags.update({str(k): str(v) for k, v in (tags or {}).items()})

    source = policy.call(
        lambda: resolve_artifact_source(client, model_uri), f"resolve {model_uri} at {where}"
    )
    policy.call(lambda: ensure_registered_model(client, name), f"create registered model {name!r} at {where}")
    mv = policy.call(
        lambda: client.create_model_version(
            name, source=source, run_id=run_id if model_uri.startswith("runs:/") else None, tags=version_tags
        ),
        f"create a version of {name!r} at {where}",
    )
    version = str(mv.version)
    policy.call(lambda: client.set_registered_model_alias(name, CHALLENGER, version), f"set alias at {where}")
    log.info("registered %s version %s as %s (source %s)", name, version, CHALLENGER, redact_uri(source))
    return version
