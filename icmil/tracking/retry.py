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

import os
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
        for k in range(len(delays) + 1):
            try:
                return fn()
            except Exception as err:
                if not is_transient(err):
                    raise TrackingError(f"{what} failed: {_short(err)}") from err
                if k == len(delays):
                    raise TrackingError(
                        f"{what} failed after {k + 1} attempt(s) over {sum(delays):.0f} s: {_short(err)}"
                    ) from err
                log.warning(
                    "%s failed (%s); retry %d/%d in %.1f s", what, _short(err), k + 1, len(delays), delays[k]
                )
                self.sleep(delays[k])
        raise AssertionError("unreachable")


def configure_mlflow_http(cfg: TrackingConfig) -> None:
    """Make MLflow's own HTTP layer fail fast so :class:`RetryPolicy` is the one retry policy in force.

    MLflow retries each request 7 times over ~4 minutes by default; stacked under our retries an outage
    would stall a stage for an hour. Explicit environment settings by the user win (``setdefault``).
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.request_timeout))


def _short(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
