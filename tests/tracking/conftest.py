"""Shared helpers for the tracking tests: configs pointing at a sqlite store or a server, a fast retry policy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from icmil.config import ICMILConfig, load_config


@pytest.fixture(autouse=True)
def _mlflow_fails_fast(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # MLflow's own HTTP retries (7 over ~4 min) would hide our retry policy and stall outage tests.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    yield


def make_cfg(run_dir: Path, *overrides: str) -> ICMILConfig:
    """A config whose tracking retries are fast (tests must not sleep for real backoff)."""
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            "tracking.retries=2",
            "tracking.retry_backoff=0.05",
            "tracking.retry_backoff_max=0.2",
            *overrides,
        ],
    )
