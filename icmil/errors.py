"""One rooted exception hierarchy: callers catch ``ICMILError`` for anything the project raises on purpose.

Example:
    >>> from icmil.errors import SlideError, ICMILError
    >>> try:
    ...     raise SlideError("s1", "file not found: /data/s1.svs", hint="check the manifest path")
    ... except ICMILError as err:
    ...     print(err)
    slide 's1': file not found: /data/s1.svs (check the manifest path)
"""

from __future__ import annotations


class ICMILError(Exception):
    """Base class of every error this project raises deliberately."""


class ConfigError(ICMILError):
    """A configuration value or file is invalid; the message names the field."""


class ManifestError(ICMILError):
    """The manifest as a whole cannot be used (missing column, unreadable file, no usable slide)."""


class SlideError(ICMILError):
    """One slide cannot be processed. Other slides go on; the stage decides whether to fail."""

    def __init__(self, slide_id: str, cause: str, hint: str | None = None) -> None:
        self.slide_id = slide_id
        self.cause = cause
        self.hint = hint
        text = f"slide {slide_id!r}: {cause}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class FeatureStoreError(ICMILError):
    """A tiles or features file is missing, stale or malformed."""


class StageFailed(ICMILError):
    """Too many slides failed in a stage; the message lists which and why."""

    def __init__(self, stage: str, failures: dict[str, str], total: int, limit: float) -> None:
        self.stage = stage
        self.failures = dict(failures)
        self.total = total
        self.limit = limit
        lines = "\n".join(f"  - {sid}: {why}" for sid, why in sorted(self.failures.items()))
        super().__init__(
            f"{stage}: {len(failures)} of {total} slides failed "
            f"(limit {limit:.0%} = max_failed_fraction); failures:\n{lines}"
        )


class PromotionRejected(ICMILError):
    """The challenger did not beat the champion (or the floor); aliases were left unchanged."""


class TrackingError(ICMILError):
    """The MLflow tracking server could not be reached or answered an error after retries."""


def check_failure_fraction(stage: str, failures: dict[str, str], total: int, limit: float) -> None:
    """Raise :class:`StageFailed` when more than ``limit`` of ``total`` slides failed.

    >>> check_failure_fraction("tile", {"s1": "missing"}, total=10, limit=0.1)  # 10 % is allowed
    """
    if total and len(failures) / total > limit:
        raise StageFailed(stage, failures, total, limit)
