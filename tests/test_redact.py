"""Secrets never reach a log, a file or an error message: one redaction (icmil.redact) for our logs, captured
third-party output, written configs and error texts."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import yaml

from icmil.cli import main
from icmil.config import config_to_yaml, dump_config, load_config
from icmil.redact import (
    RedactingStream,
    install_log_redaction,
    redact_data,
    redact_text,
    redact_uri,
    register_secret,
)

SECRET = "PLANTED-pw-7f3a"


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        (f"🏃 View run x at: http://icmil:{SECRET}@mlflow:5000/#/experiments/1/runs/abc", SECRET),
        (f"https://bucket.s3/x.csv?X-Amz-Signature={SECRET}&X-Amz-Date=1", SECRET),
        (f"postgresql://u@db/x?password={SECRET}", SECRET),
        (f"http://host/manifest.csv?token={SECRET}", SECRET),
        (f"AWS_SECRET_ACCESS_KEY={SECRET}", SECRET),
        (f'{{"api_key": "{SECRET}"}}', SECRET),
        (f"Authorization: Bearer {SECRET}", SECRET),
        (f"error: could not connect to 'postgresql+psycopg2://mlflow:{SECRET}@pg:5432/mlflow'", SECRET),
    ],
)
def test_redact_text_removes_every_kind_of_credential(text: str, leak: str) -> None:
    clean = redact_text(text)
    assert leak not in clean and "***" in clean


def test_redaction_keeps_what_is_not_secret() -> None:
    kept = "tuning.storage_secret: icmil-optuna, pipeline.mlflow_secret=icmil-mlflow, test_auc 0.91, s3://b/k.svs"
    assert redact_text(kept) == kept
    assert redact_uri("http://host:5000/x?region=eu") == "http://host:5000/x?region=eu"
    assert redact_data({"mlflow_secret": "icmil-mlflow", "password": "x", "n": [f"http://u:{SECRET}@h"]}) == {
        "mlflow_secret": "icmil-mlflow",
        "password": "***",
        "n": ["http://***@h"],
    }


def test_known_secret_values_are_removed_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-pass-123456")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:uri-pass-98765@mlflow:5000")
    text = "auth with env-pass-123456 failed; retried with uri-pass-98765 (url-encoded: uri-pass-98765)"
    assert "pass-" not in redact_text(text)
    register_secret("https://carol:registered-42-secret@x")
    assert redact_text("echo registered-42-secret") == "echo ***"


def test_third_party_log_records_are_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("mlflow").addHandler(handler)
    try:
        install_log_redaction()
        logging.getLogger("mlflow.tracking").warning("retrying http://u:%s@h/api", SECRET)
        try:
            raise ConnectionError(f"refused by http://u:{SECRET}@h")
        except ConnectionError:
            logging.getLogger("mlflow").exception("failed")
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    assert SECRET not in stream.getvalue() and "http://***@h/api" in stream.getvalue()


def test_captured_output_is_redacted_even_when_a_secret_is_split_across_writes() -> None:
    target = io.StringIO()
    stream = RedactingStream(target)
    stream.write(f"View run at: http://icmil:{SECRET[:5]}")
    stream.write(f"{SECRET[5:]}@mlflow:5000/#/x\npartial line http://a:{SECRET}@b")
    stream.flush()
    assert SECRET not in target.getvalue() and target.getvalue().count("***@") == 2


def test_pipeline_log_holds_no_secret(tmp_path: Path) -> None:
    from icmil_kfp.pipelines.runner import _LogFilter

    terminal = io.StringIO()
    with (tmp_path / "pipeline.log").open("w") as fh:
        log = _LogFilter(fh, terminal)
        log.write(f"🏃 View run train at: http://icmil:{SECRET[:3]}")
        log.write(f"{SECRET[3:]}@127.0.0.1:5000/#/experiments/1\nTraceback (most recent call last):\n")
        log.write(f"  File x\nMlflowException: API request to http://icmil:{SECRET}@h failed\n")
        log.close_pending()
    written = (tmp_path / "pipeline.log").read_text()
    assert "View run train" in written and SECRET not in written and SECRET not in terminal.getvalue()
    assert "MlflowException" in terminal.getvalue()


def test_written_configs_hold_no_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [
        f"tracking.tracking_uri=http://alice:{SECRET}@mlflow:5000",
        f"tuning.storage=postgresql://o:{SECRET}@db/o",
    ]
    cfg = load_config(None, overrides)
    assert SECRET not in config_to_yaml(cfg) and SECRET in config_to_yaml(cfg, redact=False)
    text = dump_config(cfg, tmp_path).read_text()
    assert SECRET not in text
    assert yaml.safe_load(text)["tracking"]["tracking_uri"] == "http://***@mlflow:5000"
    # A stage command with --set credentials: its OUT/config.yaml; `icmil config` prints the same redacted text.
    size = ["--set", "synth.width=1024", "--set", "synth.height=768"]
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["synth", str(tmp_path / "s"), "--slides", "2", *size, *sets]) == 0
    assert (
        main(
            ["tile", "--manifest", str(tmp_path / "s" / "manifest.csv"), "--out", str(tmp_path / "t"), *sets]
        )
        == 0
    )
    assert main(["config", *sets]) == 0
    for path in (tmp_path / "s" / "config.yaml", tmp_path / "t" / "config.yaml"):
        assert SECRET not in path.read_text() and "***@" in path.read_text()
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err


@pytest.mark.parametrize(
    "override",
    [
        f"manifest=https://bucket.s3.example/m.csv?X-Amz-Signature={SECRET}",
        f"tracking.tracking_uri=https://mlflow.example/?password={SECRET}",
        f"tracking.registry_uri=http://mlflow.example/x?token={SECRET}",
        f"tuning.storage=postgresql://optuna:{SECRET}@db:5432/optuna",
    ],
)
def test_compile_refusal_does_not_print_the_secret(
    tmp_path: Path, override: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compile", "--set", override, "--out", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert "holds a credential" in err and "***" in err and SECRET not in err
    assert not (tmp_path / "p.yaml").exists()


def test_an_unexpected_crash_prints_a_redacted_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import icmil.cli as cli

    def boom(args: object) -> int:
        raise RuntimeError(f"bug while talking to http://u:{SECRET}@h")

    monkeypatch.setattr(cli, "cmd_config", boom)
    assert main(["config"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError" in err and SECRET not in err


def test_redaction_survives_another_thread_changing_the_environment() -> None:
    """MLflow's telemetry thread sets and deletes variables while we redact a log line (it once raised KeyError)."""
    import os
    import threading

    from icmil.redact import known_secrets

    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            os.environ["_ICMIL_RACE_TEST"] = "x" * 8
            os.environ.pop("_ICMIL_RACE_TEST", None)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(2000):
            known_secrets()
    finally:
        stop.set()
        thread.join()
        os.environ.pop("_ICMIL_RACE_TEST", None)
