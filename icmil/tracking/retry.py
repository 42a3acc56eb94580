"""Retries with exponential backoff for calls to the tracking server (or its database / artifact store).

Only transient failures are retried: the server unreachable, timeouts, HTTP 429/5xx, a locked sqlite file,
S3 hiccups. A request MLflow rejects on its merits (bad parameter, missing model, duplicate name) fails at
once: retrying it would only delay the same error.

Example:
    >>> policy = RetryPolicy(retries=2, backoff=0.0)
    >>> calls = []
    >>> def flaky():
    ...     calls.append(1)
    ...     if len(calls) < 3:
    ...         raise ConnectionError("server restarting")
    ...     return "ok"
    >>> policy.call(flaky, "demo call")
    'ok'
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from icmil.errors import TrackingError
from icmil.log import get_logger

if TYPE_CHECKING:
    from icmil.config import TrackingConfig

T = TypeVar("T")
log = get_logger("tracking")

# MLflow error codes that describe the request, not the server's health: never retried.
_PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "ALREADY_EXISTS",
        "NOT_FOUND",
        "INVALID_STATE",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "BAD_REQUEST",
        "ENDPOINT_NOT_FOUND",
        "FEATURE_DISABLED",
        "CUSTOMER_UNAUTHORIZED",
    }
)


def is_transient(err: BaseException) -> bool:
    """True when ``err`` looks like an outage (worth retrying), False when the request itself is wrong."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code not in _PERMANENT_CODES
    # Connection errors, timeouts, OSError from file stores, botocore/requests errors: all transient.
    return isinstance(err, Exception) and not isinstance(
        err, (TypeError, ValueError, KeyError, TrackingError)
    )


@dataclass
class RetryPolicy:
    """``retries`` extra attempts after the first, waiting ``backoff * 2**k`` s (capped) before retry k."""

    retries: int = 5
    backoff: float = 2.0
    backoff_max: float = 60.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    @classmethod
    def from_config(cls, cfg: TrackingConfig) -> RetryPolicy:
        return cls(retries=cfg.retries, backoff=cfg.retry_backoff, backoff_max=cfg.retry_backoff_max)

    def delays(self) -> list[float]:
        """The waits before each retry, e.g. ``[2, 4, 8, 16, 32]`` for the defaults."""
        return [min(self.backoff * 2**k, self.backoff_max) for k in range(self.retries)]

    def call(self, fn: Callable[[], T], what: str, attempts: int | None = None) -> T:
        """Run ``fn``; retry transient failures; raise :class:`TrackingError` naming ``what`` at the end.

        ``attempts`` caps the number of tries (1 = a single probe without waiting).
        """
        delays = self.delays()
        if attempts is not None:
            delays = delays[: max(attempts - 1, 0)]
        started = time.monotonic()
        for k in range(len(delays) + 1):
            try:
                return fn()
            except Exception as err:
                if not is_transient(err):
                    raise TrackingError(f"{what} failed: {_short(err)}") from err
                if k == len(delays):
                    raise TrackingError(
                        f"{what} failed after {k + 1} attempt(s) over {time.monotonic() - started:.0f} s: "
                        f"{_short(err)}. Is the server up and the URI right (--tracking-uri, "
                        "tracking.tracking_uri / registry_uri, MLFLOW_TRACKING_URI)? The retry budget is "
                        "tracking.retries and tracking.request_timeout"
                    ) from err
                log.warning(
                    "%s failed (%s); retry %d/%d in %.1f s", what, _short(err), k + 1, len(delays), delays[k]
                )
                self.sleep(delays[k])
        raise AssertionError("unreachable")


def configure_mlflow_http(cfg: TrackingConfig) -> None:
    """Put MLflow's own HTTP client on the project's one budget, so :class:`RetryPolicy` is the only retry loop.

    MLflow retries each request 7 times over ~4 minutes by default, with a 120 s timeout per attempt; stacked
    under our retries, an unreachable server stalled ``icmil promote`` for ~26 minutes. Here MLflow's retries
    are 0 and its timeout is ``tracking.request_timeout``, so an outage costs at most
    :func:`outage_budget_seconds`. MLflow's "View run ... at URL" lines are turned off (the URL may carry
    credentials; our own log lines name runs with the URL redacted) and every log handler redacts secrets.
    Called before any MLflow client is built; the settings are process-wide (and reach KFP task processes).
    """
    from icmil.redact import install_log_redaction

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(cfg.request_timeout))
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    import mlflow  # noqa: F401  (creates MLflow's log handlers, so the redaction filter reaches them)

    install_log_redaction()


def outage_budget_seconds(cfg: TrackingConfig) -> float:
    """Longest a tracking call can take before it fails: every attempt times out, plus the backoff waits.

    >>> from icmil.config import TrackingConfig
    >>> outage_budget_seconds(TrackingConfig())
    48.0
    """
    policy = RetryPolicy.from_config(cfg)
    return float((policy.retries + 1) * cfg.request_timeout + sum(policy.delays()))


def describe_budget(cfg: TrackingConfig) -> str:
    """One line saying how long an outage can stall a call, and which settings decide it."""
    delays = RetryPolicy.from_config(cfg).delays()
    waits = f" ({', '.join(f'{d:g} s' for d in delays)} apart)" if delays else ""
    return (
        f"each request times out after {cfg.request_timeout} s, {cfg.retries} retr{'y' if cfg.retries == 1 else 'ies'}"
        f"{waits}: an outage is reported within {math.ceil(outage_budget_seconds(cfg))} s "
        "(tracking.request_timeout, tracking.retries)"
    )


_ROOT_CAUSES = re.compile(
    r"(\[Errno -?\d+\] [^'\")\]]+|Connection refused|Name or service not known|"
    r"Temporary failure in name resolution|(?:Read|Connect) timed out|timed out|"
    r"Remote end closed connection without response|Connection reset by peer|"
    r"response with status code \d+|database is locked)",
    re.I,
)


def _short(err: BaseException, limit: int = 300) -> str:
    """The error in one redacted line, led by its root cause when one is recognisable ("Connection refused")."""
    from icmil.redact import redact_text

    text = redact_text(f"{type(err).__name__}: {err}".replace("\n", " "))
    cause = _ROOT_CAUSES.search(text)
    if cause and len(text) > limit:
        text = f"{cause.group(0).strip()} ({text[: limit - 40]}...)"
    return text if len(text) <= limit + 60 else text[: limit + 57] + "..."
