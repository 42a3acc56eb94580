"""Where tracking goes (URI resolution) and what may be written there (secret redaction, flat params).

Example:
    >>> redact_uri("postgresql://mlflow:hunter2@db:5432/mlflow")
    'postgresql://***@db:5432/mlflow'
    >>> redact_uri("s3://bucket/key?X-Amz-Signature=abc&x=1")
    's3://bucket/key?X-Amz-Signature=***&x=1'
    >>> flatten_params({"a": {"b": 1, "password": "x"}, "c": [1, 2]})
    {'a.b': '1', 'a.password': '***', 'c': '[1, 2]'}
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    from icmil.config import ICMILConfig

REDACTED = "***"
# MLflow rejects param values longer than this; longer values are cut (the full config is an artifact).
MAX_PARAM_LENGTH = 6000
_SECRET_KEY = re.compile(
    r"(password|passwd|secret|token|api[_-]?key|access[_-]?key|credential|signature)", re.I
)
_URI_WITH_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s]*)@")


def redact_uri(value: str) -> str:
    """Remove credentials from a URI: ``user:password@`` and secret-looking query parameters.

    Non-URI strings are returned unchanged.
    """
    if "://" not in value:
        return value
    value = _URI_WITH_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value, count=1)
    parts = urlsplit(value)
    if parts.query:
        query = [
            (k, REDACTED if _SECRET_KEY.search(k) else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        value = urlunsplit(parts._replace(query=urlencode(query, safe="*")))
    return value


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b": "value"}`` strings fit for MLflow params, secrets redacted.

    Values under secret-looking keys become ``***``; URIs lose their credentials; lists are JSON.
    """
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
            continue
        if _SECRET_KEY.search(str(key)) and value not in (None, ""):
            text = REDACTED
        elif isinstance(value, str):
            text = redact_uri(value)
        elif isinstance(value, (list, tuple, Mapping)):
            text = json.dumps(_redact_nested(value), default=str)
        else:
            text = str(value)
        out[name] = text[:MAX_PARAM_LENGTH]
    return out


def _redact_nested(value: Any) -> Any:
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, Mapping):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else _redact_nested(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_nested(v) for v in value]
    return value


def config_params(cfg: ICMILConfig) -> dict[str, str]:
    """The resolved config as flat, redacted MLflow params (``mil.lr``, ``tracking.tracking_uri``, ...)."""
    return flatten_params(cfg.model_dump(mode="json"))


def resolve_tracking_uri(cfg: ICMILConfig) -> str:
    """Tracking URI: ``cfg.tracking.tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///RUN/mlflow.db``.

    >>> from icmil.config import load_config
    >>> resolve_tracking_uri(load_config(None, ["tracking.tracking_uri=http://mlflow:5000"]))
    'http://mlflow:5000'
    """
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(cfg.run_dir).resolve() / 'mlflow.db'}"


def resolve_registry_uri(cfg: ICMILConfig) -> str:
    """Registry URI: ``cfg.tracking.registry_uri`` > ``$MLFLOW_REGISTRY_URI`` > the tracking URI."""
    return cfg.tracking.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or resolve_tracking_uri(cfg)


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for a new experiment: beside the sqlite file for sqlite stores, else the server's choice.

    Without this MLflow would put a sqlite store's artifacts in ``./mlruns`` of whatever the CWD is.
    """
    if tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri[len("sqlite:///") :])
        return (db_path.parent / "mlartifacts").resolve().as_uri()
    return None


def is_local_store(uri: str) -> bool:
    """True for stores this process opens itself (sqlite/file), False for a server or remote database."""
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri
