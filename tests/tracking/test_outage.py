"""Tracking-server outages: retried with backoff, the stage goes on, its outputs are on disk, the error is
clear and names the spool, and the spooled calls reach the server once it is back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file

from icmil.errors import TrackingError
from icmil.tracking import MlflowTracker, RetryPolicy
from icmil.tracking.retry import is_transient
from tests.fixtures.postgres import free_port
from tests.tracking.helpers import TcpProxy


def _train(run, out: Path, epochs: range) -> Path:  # type: ignore[no-untyped-def]
    """A stand-in training loop: per-epoch metrics, then the weights are written (atomically, last)."""
    for epoch in epochs:
        run.log_metrics({"train_loss": 1.0 / (epoch + 1), "val_auc": 0.5 + epoch / 100}, step=epoch)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(2, 2)}, str(out / "weights.safetensors"))
    return out / "weights.safetensors"


def test_retry_policy_backoff_and_permanent_errors() -> None:
    from mlflow.exceptions import MlflowException

    sleeps: list[float] = []
    policy = RetryPolicy(retries=4, backoff=0.5, backoff_max=2.0, sleep=sleeps.append)
    with pytest.raises(TrackingError, match="after 5 attempt"):
        policy.call(lambda: (_ for _ in ()).throw(ConnectionError("refused")), "demo")
    assert sleeps == [0.5, 1.0, 2.0, 2.0]
    # A request MLflow rejects on its merits is not retried.
    sleeps.clear()
    bad = MlflowException.invalid_parameter_value("bad param")
    with pytest.raises(TrackingError, match="bad param"):
        policy.call(lambda: (_ for _ in ()).throw(bad), "demo")
    assert sleeps == [] and not is_transient(bad) and is_transient(MlflowException("API request failed"))


def test_unreachable_server_does_not_cost_the_training(tmp_path: Path) -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(retries=3, backoff=0.01, backoff_max=0.04, sleep=sleeps.append)
    dead = f"http://127.0.0.1:{free_port()}"
    tracker = MlflowTracker(dead, "icmil", "0123abcd", retry=policy, spool_dir=tmp_path / "spool")
    with pytest.raises(TrackingError) as err, tracker.stage("train", round_index=0) as run:
        weights = _train(run, tmp_path / "head", range(5))
    assert weights.is_file()  # the training finished and its output is intact
    assert sleeps[:3] == [0.01, 0.02, 0.04] and sleeps[-3:] == [0.01, 0.02, 0.04]  # open, then final flush
    message = str(err.value)
    spool = tracker.spool_path("round0/train")
    assert "round0/train" in message and "outputs are complete on disk" in message and str(spool) in message
    ops = json.loads(spool.read_text())["ops"]
    assert [o["op"] for o in ops].count("metrics") == 5 and ops[0]["op"] == "open" and ops[-1]["op"] == "end"
    assert not list(spool.parent.glob("*.live-*"))


@pytest.mark.servers
def test_outage_mid_stage_against_a_real_server(mlflow_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("outage") or client.get_experiment(client.create_experiment("outage"))
    parent = client.create_run(exp.experiment_id, run_name="pipeline").info.run_id
    proxy = TcpProxy(int(mlflow_server.url.rsplit(":", 1)[1]))
    sleeps: list[float] = []
    policy = RetryPolicy(retries=2, backoff=0.01, backoff_max=0.05, sleep=sleeps.append)
    spool_dir = tmp_path / "spool"
    try:
        # Outage that heals before the stage ends: queued calls are delivered, no error.
        tracker = MlflowTracker(proxy.url, "outage", parent, retry=policy, spool_dir=spool_dir)
        with tracker.stage("train", round_index=0) as run:
            _train(run, tmp_path / "r0", range(0, 2))
            proxy.down()
            _train(run, tmp_path / "r0", range(2, 4))
            proxy.up()
        history = client.get_metric_history(run.run_id, "val_auc")
        assert [m.step for m in history] == [0, 1, 2, 3]
        assert client.get_run(run.run_id).info.status == "FINISHED"
        assert sleeps, "the failed calls were retried with backoff"

        # Outage that outlasts the stage: TrackingError after the weights are written; a later stage
        # (here: the same stage resumed by a new process) replays the spool into the same child run.
        with pytest.raises(TrackingError, match="replayed"), tracker.stage("train", round_index=1) as run:
            _train(run, tmp_path / "r1", range(0, 1))
            proxy.down()
            weights = _train(run, tmp_path / "r1", range(1, 3))
        assert weights.is_file()
        child = run.run_id
        proxy.up()
        resumed = MlflowTracker(proxy.url, "outage", parent, retry=policy, spool_dir=spool_dir)
        with resumed.stage("train", round_index=1) as again:
            assert again.run_id == child
        assert [m.step for m in client.get_metric_history(child, "val_auc")] == [0, 1, 2]
        assert client.get_run(child).info.status == "FINISHED"
        assert not any(spool_dir.rglob("*.json"))
    finally:
        proxy.down()
