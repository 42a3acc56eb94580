"""`icmil promote` / `icmil predict` as a user runs them against a registry that is down, slow or absent:
bounded by one budget (MLflow's own client included), a first message at once, a clear error; read-only
commands never create a registry; a dry run says "would promote"."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from icmil.cli import main
from icmil.config import TrackingConfig
from icmil.tracking.retry import outage_budget_seconds
from tests.fixtures.postgres import free_port
from tests.tracking.helpers import fresh_sqlite

MLFLOW_ENV = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
)


@pytest.fixture()
def mlflow_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own retry settings as a user's shell has them (7 retries, 120 s), restored afterwards."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")


@pytest.fixture()
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never answers (a hung proxy): only timeouts end a request."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn in held:
        conn.close()


def test_default_budget_reports_an_outage_within_a_minute() -> None:
    assert outage_budget_seconds(TrackingConfig()) <= 60


def test_promote_against_a_dead_server_fails_fast_and_clearly(
    mlflow_defaults: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main(["promote", "--tracking-uri", dead, "--dry-run"]) == 2
    took = time.monotonic() - started
    err = capsys.readouterr().err
    # MLflow's own 7 retries are off (they stacked under ours: ~26 min); our 2 retries wait 1 s + 2 s.
    assert took < 20, took
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == str(TrackingConfig().request_timeout)
    first = caplog.records[0].getMessage()
    assert "promote: registry" in first and "reported within 48 s" in first  # said before the first request
    assert "Connection refused" in caplog.text and "retry 1/2" in caplog.text
    assert "Connection refused" in err and "after 3 attempt(s)" in err and "Is the server up" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_hung_server_is_bounded_by_request_timeout_and_retries(
    mlflow_defaults: None,
    silent_server: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = [
        "--set",
        "tracking.request_timeout=1",
        "--set",
        "tracking.retries=1",
        "--set",
        "tracking.retry_backoff=0.5",
    ]
    started = time.monotonic()
    code = main(
        [
            "predict",
            "--model",
            "models:/m@champion",
            "--tracking-uri",
            silent_server,
            *budget,
            "--out",
            str(tmp_path / "o"),
            "slide.svs",
        ]
    )
    took = time.monotonic() - started
    assert code == 2
    assert took < 2 * 1 + 0.5 + 5, took  # two 1-s attempts and one 0.5-s wait (plus start-up slack)
    err = capsys.readouterr().err
    assert "reported within 3 s" in caplog.records[0].getMessage() and "timed out" in err.lower()
    assert not (tmp_path / "o").exists()  # a failed load writes nothing


def test_read_only_commands_never_create_a_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's predict command run outside the repository root: an error naming the path, not a new
    empty runs/demo/mlflow.db followed by "model not found"."""
    repo_config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = ["--model", "models:/icmil-slide-classifier@champion"]
    assert main(["predict", "--config", str(repo_config), *model, "new_slide.tiff"]) == 2
    err = capsys.readouterr().err
    wanted = elsewhere / "runs" / "demo" / "mlflow.db"
    assert f"no MLflow registry at {wanted}" in err
    assert "working directory" in err and str(repo_config) in err and "--tracking-uri" in err
    assert main(["promote", "--config", str(repo_config), "--dry-run"]) == 2
    assert f"no MLflow registry at {wanted}" in capsys.readouterr().err
    missing = tmp_path / "nowhere" / "mlflow.db"
    assert main(["promote", "--tracking-uri", f"sqlite:///{missing}", "--dry-run"]) == 2
    assert "from --tracking-uri" in capsys.readouterr().err
    assert not any(elsewhere.iterdir()) and not missing.parent.exists()


def test_dry_run_says_would_promote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    from icmil.registry.versions import metric_tag

    uri = fresh_sqlite(tmp_path / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("m")
    mv = client.create_model_version("m", source=str(tmp_path), tags={metric_tag("test", "auc"): "0.9"})
    client.set_registered_model_alias("m", "challenger", mv.version)
    assert main(["promote", "--model", "m", "--tracking-uri", uri, "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("WOULD PROMOTE m v1:") and "dry run: nothing was changed" in out
    assert "PROMOTED" not in out.replace("WOULD PROMOTE", "")
    assert not client.get_registered_model("m").aliases.get("champion")
    assert (
        main(
            [
                "promote",
                "--model",
                "m",
                "--tracking-uri",
                uri,
                "--set",
                "tracking.promotion_floor=0.95",
                "--dry-run",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip().startswith("WOULD NOT PROMOTE m v1:")
    assert main(["promote", "--model", "m", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.strip().startswith("PROMOTED m v1:")
