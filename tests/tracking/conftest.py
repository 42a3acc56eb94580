"""Shared helpers for the tracking tests: configs pointing at a sqlite store or a server, a fast retry policy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tracking.helpers import CLASSES, TEMPLATE


@pytest.fixture(autouse=True)
def _mlflow_fails_fast(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # MLflow's own HTTP retries (7 over ~4 min) would hide our retry policy and stall outage tests.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    yield


@pytest.fixture(scope="session", autouse=True)
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Creating an MLflow sqlite store runs its migrations (~3 s on two cores): do it once, copy the file.
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("sqlite_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    TEMPLATE["db"] = db


@pytest.fixture(scope="session")
def tiny_model_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny synthetic slide, a saved tiny_cnn encoder and two small saved AB-MIL heads (different seeds)."""
    import torch

    from icmil.config import EncoderConfig, SynthConfig
    from icmil.features import create_encoder, save_encoder
    from icmil.mil import create_mil_head, save_mil_head
    from icmil.slides import write_synthetic_slide

    root = tmp_path_factory.mktemp("model_parts")
    slide = root / "slide_a.tiff"
    write_synthetic_slide(slide, SynthConfig(), seed=1, positive=True, width=1024, height=768)
    encoder = create_encoder(EncoderConfig(name="tiny_cnn"), quiet_random=True)
    save_encoder(encoder, root / "encoder")
    parts = {"slide": slide, "encoder": root / "encoder", "root": root}
    for seed in (0, 1):
        torch.manual_seed(seed)
        head = create_mil_head("abmil", in_dim=encoder.out_dim, n_classes=2, hidden_dim=8, attention_dim=4)
        head.classes = list(CLASSES)
        save_mil_head(head, root / f"head{seed}")
        parts[f"head{seed}"] = root / f"head{seed}"
    return parts


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests on the real servers run last, so the servers' ~30 s start overlaps the other tests
    # (see _launch_servers_early).
    items.sort(key=lambda item: "mlflow_server" in getattr(item, "fixturenames", ()))


@pytest.fixture(autouse=True, scope="session")
def _launch_servers_early(request: pytest.FixtureRequest) -> None:
    """Start PostgreSQL, S3 and the MLflow server in the background as soon as the first tracking test runs
    if any selected test needs them; the tests that do use them wait for /health."""
    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("mlflow_server_launch")
