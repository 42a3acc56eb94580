"""Where a study lives, and the lock that keeps parallel workers to an exact trial budget.

Storage: sqlite in the run folder by default; a PostgreSQL URL (``tuning.storage`` or, on a cluster, the
environment variable ``tuning.storage_env`` filled from a Kubernetes Secret) when several workers share a study.
Every storage is an Optuna ``RDBStorage`` with heartbeats: a worker that dies mid-trial stops heart-beating,
the next worker to look fails that trial and :class:`optuna.storages.RetryHeartbeatStaleTrialCallback`
re-queues it (as a WAITING copy with the same parameters) up to ``tuning.max_retry`` times.

:func:`study_lock` serialises "how many trials are left? then take one" between workers: a PostgreSQL advisory
lock on PostgreSQL, an ``flock`` beside the sqlite file. Both are released by the OS / server when a worker dies.

Example:
    >>> from icmil.config import load_config
    >>> cfg = load_config(None, ["run_dir=/tmp/run", "tuning.storage=null"])
    >>> resolve_storage(cfg, environ={})
    'sqlite:////tmp/run/optuna.db'
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmil.errors import ConfigError
from icmil.log import get_logger
from icmil.tracking.uris import redact_uri

if TYPE_CHECKING:
    import optuna

    from icmil.config import ICMILConfig

log = get_logger("tuning")

_LOCAL_LOCKS: dict[str, threading.Lock] = {}


def resolve_storage(
    cfg: ICMILConfig, storage: str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The study storage URL: ``storage`` > ``tuning.storage`` > ``$<tuning.storage_env>`` > ``RUN/optuna.db``."""
    env = os.environ if environ is None else environ
    url = storage or cfg.tuning.storage or env.get(cfg.tuning.storage_env) or ""
    if not url:
        return f"sqlite:///{Path(cfg.run_dir).resolve() / 'optuna.db'}"
    if "://" not in url:
        raise ConfigError(
            # Not echoed: without a scheme nothing marks where a password would sit in it.
            "tuning.storage (or $" + cfg.tuning.storage_env + ") is not a database URL "
            "(use sqlite:///path/optuna.db or postgresql://user:pass@host:5432/db)"
        )
    return with_driver(url)


def with_driver(url: str) -> str:
    """``postgresql://`` and ``postgres://`` spelled with the psycopg2 driver when psycopg 3 is not installed.

    SQLAlchemy >= 2.1 maps a bare ``postgresql://`` to psycopg 3, while this project installs psycopg2-binary;
    users (and Kubernetes Secrets) naturally write the bare form.

    >>> with_driver("sqlite:///x.db")
    'sqlite:///x.db'
    """
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is not None:
        return f"postgresql{sep}{rest}"
    return f"postgresql+psycopg2{sep}{rest}"


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///") :])


def open_storage(url: str, cfg: ICMILConfig, attempts: int = 5) -> optuna.storages.RDBStorage:
    """An ``RDBStorage`` on ``url`` with heartbeats and stale-trial retries from ``cfg.tuning``.

    Connecting is retried a few times: workers that start together may race to create the schema.
    """
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import ArgumentError

    kwargs: dict[str, object]
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several local workers write one sqlite file: wait for the write lock instead of failing at once.
        kwargs = {"connect_args": {"timeout": 60}}
    else:
        kwargs = {"pool_pre_ping": True}
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            with _quiet_experimental():
                return RDBStorage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=cfg.tuning.heartbeat_interval,
                    grace_period=cfg.tuning.heartbeat_grace_period,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=cfg.tuning.max_retry
                    ),
                )
        except ImportError as err:
            raise ConfigError(f"no database driver for {redact_uri(url)}: {err}") from None
        except ArgumentError as err:
            raise ConfigError(
                f"tuning.storage {redact_uri(url)!r} is not a valid database URL: {err}"
            ) from None
        except Exception as err:  # a database not up yet, or a schema race between workers: retried
            last = err
            time.sleep(0.5 * (attempt + 1))
    raise ConfigError(
        f"cannot open the Optuna storage {redact_uri(url)} after {attempts} attempts: {last} "
        f"(check the URL in tuning.storage / ${cfg.tuning.storage_env} and that the database is reachable)"
    )


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _lock_key(study_name: str) -> int:
    # PostgreSQL advisory locks take a signed 64-bit key.
    return int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def study_lock(storage: optuna.storages.BaseStorage, url: str, study_name: str) -> Iterator[None]:
    """Hold an inter-process lock private to ``study_name`` (see the module docstring)."""
    if url.startswith(("postgresql", "postgres")):
        from sqlalchemy import text

        key = _lock_key(study_name)
        # A study wraps its RDBStorage in a cache layer; the engine lives on the wrapped one.
        backend: Any = getattr(storage, "_backend", storage)
        engine = backend.engine
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        return
    path = _sqlite_path(url)
    if path is not None:
        lock_file = path.with_name(f"{path.name}.{_lock_key(study_name) & 0xFFFFFFFF:08x}.lock")
        with open(lock_file, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    # Other databases: exact budgets hold only among the workers of this process.
    log.warning("no inter-process lock for %s: parallel workers may overshoot n_trials", redact_uri(url))
    lock = _LOCAL_LOCKS.setdefault(study_name, threading.Lock())
    with lock:
        yield
