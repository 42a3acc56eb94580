"""Logging and progress bars shared by every stage.

Example:
    >>> log = get_logger("tile")
    >>> for _ in progress(range(3), desc="demo", disable=True):
    ...     pass
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_CONFIGURED = False


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``icmil`` namespace, configured once to print ``time level stage: message``.

    Every record passes :class:`icmil.redact.RedactingFilter`: no credential reaches the log.
    """
    global _CONFIGURED
    if not _CONFIGURED:
        from icmil.redact import RedactingFilter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler.addFilter(RedactingFilter())
        root = logging.getLogger("icmil")
        root.addHandler(handler)
        root.setLevel(os.environ.get("ICMIL_LOG_LEVEL", "INFO"))
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(f"icmil.{name}")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kw: Any) -> Iterable[T]:
    """A tqdm bar on stderr; off when ``ICMIL_PROGRESS=0`` (CI logs) unless ``disable`` is given."""
    kw.setdefault("disable", os.environ.get("ICMIL_PROGRESS", "1") == "0")
    kw.setdefault("mininterval", 1.0)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, **kw)
