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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmil.nested import join, leaves
from icmil.redact import REDACTED, is_secret_key, redact_data, redact_text, redact_uri

if TYPE_CHECKING:
    from icmil.config import ICMILConfig

# MLflow rejects param values longer than this; longer values are cut (the full config is an artifact).
MAX_PARAM_LENGTH = 6000


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b": "value"}`` strings fit for MLflow params, secrets redacted.

    Values under secret-looking keys become ``***``; URIs lose their credentials; lists are JSON.
    """
    out: dict[str, str] = {}
    for path, value in leaves(data, keep_empty=True):
        name, key = prefix + join(path), path[-1]
        if is_secret_key(key) and value not in (None, ""):
            text = REDACTED
        elif isinstance(value, str):
            text = redact_text(redact_uri(value))
        elif isinstance(value, (list, tuple, Mapping)):
            text = json.dumps(redact_data(value), default=str)
        else:
            text = str(value)
        out[name] = text[:MAX_PARAM_LENGTH]
    return out


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


# --------------------------------------------------------------------------- read-only access


@dataclass(frozen=True)
class StoreUris:
    """The tracking and registry URIs a command uses, and in words where each came from (for error messages)."""

    tracking_uri: str
    registry_uri: str
    tracking_origin: str
    registry_origin: str


def resolve_store_uris(
    cfg: ICMILConfig, tracking_uri: str | None = None, config_source: str | None = None
) -> StoreUris:
    """Resolve both URIs like :func:`resolve_tracking_uri` / :func:`resolve_registry_uri` (``tracking_uri``,
    e.g. ``--tracking-uri``, wins; the registry follows it unless the config names one) and say where each
    came from. ``config_source`` names the config file, for the messages.

    >>> from icmil.config import load_config
    >>> s = resolve_store_uris(load_config(None, ["run_dir=/data/run"]))
    >>> s.registry_uri, s.registry_origin.split(" (")[0]
    ('sqlite:////data/run/mlflow.db', 'the default sqlite file in run_dir')
    """
    where = f" of {config_source}" if config_source else ""
    if tracking_uri:
        t_uri, t_origin = tracking_uri, "--tracking-uri"
    elif cfg.tracking.tracking_uri:
        t_uri, t_origin = cfg.tracking.tracking_uri, f"tracking.tracking_uri{where}"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        t_uri, t_origin = os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI"
    else:
        run_dir = Path(cfg.run_dir)
        against = (
            f", a relative path resolved against the working directory {Path.cwd()}"
            if not run_dir.is_absolute()
            else ""
        )
        t_uri = resolve_tracking_uri(cfg)
        t_origin = f"the default sqlite file in run_dir (run_dir {str(run_dir)!r}{where}{against})"
    if cfg.tracking.registry_uri:
        r_uri, r_origin = cfg.tracking.registry_uri, f"tracking.registry_uri{where}"
    elif not tracking_uri and os.environ.get("MLFLOW_REGISTRY_URI"):
        r_uri, r_origin = os.environ["MLFLOW_REGISTRY_URI"], "$MLFLOW_REGISTRY_URI"
    else:
        r_uri, r_origin = t_uri, t_origin
    return StoreUris(t_uri, r_uri, t_origin, r_origin)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI (absolute), None for any other store.

    >>> str(sqlite_file("sqlite:////data/mlflow.db")), sqlite_file("http://mlflow:5000")
    ('/data/mlflow.db', None)
    """
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:") :]
    path = rest[3:] if rest.startswith("///") else rest.lstrip("/")
    return Path(path.split("?", 1)[0]).resolve()


def require_existing_store(uri: str, origin: str, command: str) -> None:
    """Refuse a sqlite store that does not exist: MLflow would create an empty database there as a side effect
    of a read, and the command would then fail with a misleading "model not found".

    Raises :class:`~icmil.errors.ConfigError` naming the resolved path, where it came from, and the fix.
    """
    from icmil.errors import ConfigError

    path = sqlite_file(uri)
    if path is None or path.is_file():
        return
    raise ConfigError(
        f"no MLflow registry at {path} (the sqlite file does not exist; {command} created nothing). "
        f"The path comes from {origin}. Run the command from the folder the pipeline ran in, or point at the "
        f"registry: --tracking-uri sqlite:///<absolute path to mlflow.db>, --set run_dir=<absolute run folder>, "
        "or MLFLOW_TRACKING_URI / tracking.registry_uri for a server"
    )
