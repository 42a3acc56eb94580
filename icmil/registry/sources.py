"""Where a registered model's files are: MLflow clients for a tracking/registry pair, and model URIs resolved to
storage locations that another registry (or another process) can read.

This is the bottom of :mod:`icmil.registry`: the version records (:mod:`~icmil.registry.versions`), the gate
(:mod:`~icmil.registry.gate`) and the model bundle (:mod:`~icmil.registry.slide_classifier`) all build on it.

Example:
    >>> absolute_source("mlflow-artifacts:/1/abc/artifacts/m", "http://mlflow.dev:5000")
    'http://mlflow.dev:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/m'
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from mlflow import MlflowClient


def clients(tracking_uri: str | None, registry_uri: str | None) -> MlflowClient:
    """One MLflow client for the registry ``registry_uri`` (its runs' artifacts from ``tracking_uri``)."""
    from mlflow import MlflowClient

    # A registry-only call still needs a tracking store (run artifacts): the registry's own server/database
    # rather than MLflow's fallback (./mlflow.db in the working directory).
    tracking_uri = tracking_uri or registry_uri
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def registry_of(client: MlflowClient) -> str:
    return str(client._registry_uri)


def tracking_of(client: MlflowClient) -> str:
    return str(client._tracking_client.tracking_uri)


def parse_runs_uri(uri: str) -> tuple[str, str]:
    """``runs:/RUN_ID/a/b`` -> ``("RUN_ID", "a/b")``.

    >>> parse_runs_uri("runs:/abc/slide_classifier")
    ('abc', 'slide_classifier')
    """
    rest = uri[len("runs:/") :]
    run_id, _, path = rest.partition("/")
    return run_id, path.strip("/")


def resolve_artifact_source(client: MlflowClient, model_uri: str) -> str:
    """The storage location behind ``model_uri`` (``runs:/``, ``models:/m-<id>``, a local path or any URI)."""
    if model_uri.startswith("runs:/"):
        run_id, path = parse_runs_uri(model_uri)
        root = client.get_run(run_id).info.artifact_uri.rstrip("/")
        return f"{root}/{path}" if path else root
    if model_uri.startswith("models:/m-"):
        return str(client.get_logged_model(model_uri[len("models:/") :].strip("/")).artifact_location)
    if "://" not in model_uri and ":/" not in model_uri:
        return Path(model_uri).resolve().as_uri()
    return model_uri


def absolute_source(source: str, tracking_uri: str) -> str:
    """Make a server-relative ``mlflow-artifacts:/path`` usable from another registry.

    ``mlflow-artifacts:`` URIs only resolve against the tracking server that issued them, so they are
    rewritten to that server's plain HTTP artifact endpoint, which any registry can store and load from.

    >>> absolute_source("mlflow-artifacts:/1/abc/artifacts/m", "http://mlflow.dev:5000")
    'http://mlflow.dev:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/m'
    """
    if source.startswith("mlflow-artifacts:"):
        parts = urlsplit(source)
        server = urlsplit(tracking_uri)
        if server.scheme in ("http", "https"):
            netloc = parts.netloc or server.netloc
            path = parts.path.lstrip("/")
            return f"{server.scheme}://{netloc}{server.path.rstrip('/')}/api/2.0/mlflow-artifacts/artifacts/{path}"
    return source
