"""Session-wide test settings and the real-server fixtures (S3, PostgreSQL, MLflow) from tests/fixtures/."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("ICMIL_PROGRESS", "0")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

# Fixture modules register themselves here once they exist; each starts a real server on 127.0.0.1.
pytest_plugins = [
    m
    for m in ("tests.fixtures.s3", "tests.fixtures.postgres", "tests.fixtures.mlflow_server")
    if importlib.util.find_spec(m) is not None
]


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    # Two cores: torch's default intra-op pool plus DataLoader workers oversubscribes them.
    import torch

    torch.set_num_threads(2)
