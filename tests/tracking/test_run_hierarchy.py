"""Run hierarchy on the embedded sqlite store: parent run, child runs per round/stage, resume, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from icmil.errors import TrackingError
from icmil.tracking import (
    MlflowTracker,
    NullTracker,
    end_parent_run,
    resolve_tracking_uri,
    start_parent_run,
    tracker_for,
)
from icmil.tracking.mlflow_tracker import TAG_PARENT
from icmil.tracking.uris import flatten_params, redact_uri
from tests.tracking.helpers import make_cfg


def test_resolve_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(tmp_path / "run")
    assert resolve_tracking_uri(cfg) == f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(cfg) == "http://env:5000"
    cfg = make_cfg(tmp_path / "run", "tracking.tracking_uri=http://cfg:5000")
    assert resolve_tracking_uri(cfg) == "http://cfg:5000"


def test_redaction_removes_credentials() -> None:
    assert redact_uri("postgresql://user:pw@db:5432/x") == "postgresql://***@db:5432/x"
    assert redact_uri("http://tok@host/") == "http://***@host/"
    assert redact_uri("s3://b/k?token=abc&region=eu") == "s3://b/k?token=***&region=eu"
    assert redact_uri("/plain/path") == "/plain/path"
    flat = flatten_params({"a": {"db": "mysql://u:p@h/d", "aws_secret_access_key": "zz"}, "n": None})
    assert flat == {"a.db": "mysql://***@h/d", "a.aws_secret_access_key": "***", "n": "None"}


def test_null_tracker_when_no_parent(tmp_path: Path) -> None:
    tracker = tracker_for(make_cfg(tmp_path), "")
    assert isinstance(tracker, NullTracker)
    with tracker.stage("train", 0) as run:
        run.log_metrics({"x": 1.0}, step=0)
        assert run.run_id == ""


def test_parent_and_child_runs_on_sqlite(tmp_path: Path) -> None:
    secret_url = "postgresql://optuna:s3cr3tpw@db:5432/optuna"
    cfg = make_cfg(tmp_path / "run", f"tuning.storage={secret_url}")
    parent = start_parent_run(
        cfg, run_name="pipeline", kfp_run_id="kfp-123", manifest_digest="m" * 16, encoder_digest="e" * 16
    )
    client = MlflowClient(resolve_tracking_uri(cfg))
    prun = client.get_run(parent)
    # Config as flat params, secrets redacted; lineage tags.
    assert prun.data.params["mil.head"] == cfg.mil.head
    assert prun.data.params["tuning.storage"] == "postgresql://***@db:5432/optuna"
    assert not any("s3cr3tpw" in v for v in prun.data.params.values())
    assert prun.data.tags["icmil.kfp_run_id"] == "kfp-123"
    assert prun.data.tags["icmil.manifest_digest"] == "m" * 16
    assert prun.data.tags["icmil.encoder_digest"] == "e" * 16
    config_yaml = Path(client.download_artifacts(parent, "config.yaml", str(tmp_path)))
    assert "s3cr3tpw" not in config_yaml.read_text() and "mil:" in config_yaml.read_text()
    # Artifacts live beside the sqlite file, not in ./mlruns of the CWD.
    assert prun.info.artifact_uri.startswith((tmp_path / "run" / "mlartifacts").resolve().as_uri())

    tracker = tracker_for(cfg, parent)
    assert isinstance(tracker, MlflowTracker)
    plot = tmp_path / "roc.png"
    plot.write_bytes(b"\x89PNG fake")
    for round_index in (0, 1):
        with tracker.stage("train", round_index=round_index, tags={"icmil.encoder_digest": "e1"}) as run:
            run.log_params({"lr": 2e-4, "head": "abmil"})
            for epoch in range(3):
                run.log_metrics({"train_loss": 1.0 / (epoch + 1), "val_auc": 0.5 + 0.1 * epoch}, step=epoch)
            run.log_artifact(plot, "plots")
            run.set_tags({"note": "ok"})
    with tracker.parent() as prun_handle:
        prun_handle.log_metrics({"round0.test_auc": 0.8, "round1.test_auc": 0.9})
    end_parent_run(cfg, parent)

    children = client.search_runs([prun.info.experiment_id], f"tags.`{TAG_PARENT}` = '{parent}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"round0/train", "round1/train"}
    child = by_name["round1/train"]
    assert child.info.status == "FINISHED"
    assert child.data.tags["icmil.round"] == "1" and child.data.tags["icmil.stage"] == "train"
    history = client.get_metric_history(child.info.run_id, "val_auc")
    assert [m.step for m in history] == [0, 1, 2]
    assert [a.path for a in client.list_artifacts(child.info.run_id, "plots")] == ["plots/roc.png"]
    final = client.get_run(parent)
    assert final.info.status == "FINISHED" and final.data.metrics["round1.test_auc"] == 0.9

    # Resume: the same config + run folder reuses the parent; a resumed stage reuses its child run.
    assert start_parent_run(cfg, run_name="pipeline", kfp_run_id="kfp-123") == parent
    with tracker_for(cfg, parent).stage("train", round_index=1) as again:
        again.log_params({"lr": 2e-4})  # identical value: fine
        again.log_metrics({"val_auc": 0.95}, step=3)
        assert again.run_id == child.info.run_id
    with pytest.raises(TrackingError, match="params differ"), tracker.stage("train", round_index=1) as again:
        again.log_params({"lr": 1e-3})
    children = client.search_runs([prun.info.experiment_id], f"tags.`{TAG_PARENT}` = '{parent}'")
    assert len(children) == 2


def test_nested_runs_through_the_tracker_interface(tmp_path: Path) -> None:
    # How tuning trials nest under the round's tune run: tracker.nested(run_id), for every tracker alike.
    from icmil.tuning.worker import _trial_tracker

    assert NullTracker().nested("abc") is not None
    null, nested = _trial_tracker(NullTracker(), "abc")
    assert isinstance(null, NullTracker) and nested
    cfg = make_cfg(tmp_path / "run")
    parent = start_parent_run(cfg, run_name="pipeline")
    tracker = tracker_for(cfg, parent)
    with tracker.stage("tune", round_index=0) as tune:
        trials, nested = _trial_tracker(tracker, tune.run_id)
        assert nested and trials is not tracker
        with trials.stage("trial0") as trial:
            trial.log_metrics({"trial_val_auc": 0.7})
    assert _trial_tracker(tracker, None) == (tracker, False)
    client = MlflowClient(resolve_tracking_uri(cfg))
    run = client.get_run(trial.run_id)
    assert run.info.run_name == "trial0" and run.data.tags[TAG_PARENT] == tune.run_id
    assert client.get_run(tune.run_id).data.tags[TAG_PARENT] == parent


def test_failed_stage_is_marked_failed(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "run")
    parent = start_parent_run(cfg)
    tracker = tracker_for(cfg, parent)
    with pytest.raises(RuntimeError, match="boom"), tracker.stage("embed", round_index=0) as run:
        run.log_metrics({"slides_done": 1})
        raise RuntimeError("boom")
    client = MlflowClient(resolve_tracking_uri(cfg))
    assert client.get_run(run.run_id).info.status == "FAILED"


def test_rejected_call_does_not_abort_the_stage(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "run")
    tracker = tracker_for(cfg, start_parent_run(cfg))
    reached = False
    with pytest.raises(TrackingError, match="does not exist"), tracker.stage("train", 0) as run:
        run.log_artifact(tmp_path / "never-written.png")  # MLflow-side error, not an outage
        run.log_metrics({"val auc [test]": 0.7}, step=0)  # unusual characters are made legal
        reached = True
    assert reached
    client = MlflowClient(resolve_tracking_uri(cfg))
    assert client.get_run(run.run_id).data.metrics == {"val auc _test_": 0.7}
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_parent_of_another_server_fails_before_the_stage_runs(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "run")
    start_parent_run(cfg)
    with (
        pytest.raises(TrackingError, match="cannot open its child run"),
        tracker_for(cfg, "f" * 32).stage("x"),
    ):
        raise AssertionError("the stage body must not run")
