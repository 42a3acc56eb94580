"""The pipeline's MLflow parent run carries the per-round metrics, the coupling gain and the gate's decision, so
the experiment table compares pipeline runs without opening each child run."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from icmil.run_summary import (
    gate_record,
    log_run_summary,
    parent_run_metrics,
    per_round_metrics,
    write_run_summary,
)
from icmil.tracking import NullTracker, start_parent_run, tracker_for
from icmil.tracking.uris import resolve_tracking_uri
from tests.tracking.helpers import make_cfg

ROUNDS = [
    {"round": 0, "val_auc": 0.70, "test_auc": 0.65, "patch_auc_test": 0.60, "head": "abmil"},
    {"round": 1.0, "val_auc": 0.80, "test_auc": 0.75, "patch_auc_test": 0.72, "finetune_best_step": 50},
]
REGISTRATION = {"model": "icmil", "version": "3", "promote": True, "reason": "beats v2 by 0.05"}


def test_per_round_metrics_are_gathered_for_every_consumer() -> None:
    table = per_round_metrics(ROUNDS)
    assert list(table) == [0, 1] and table[1]["finetune_best_step"] == 50.0 and "head" not in table[0]
    batches = parent_run_metrics(ROUNDS)
    assert batches[0] == ({"round_val_auc": 0.7, "round_test_auc": 0.65, "round_patch_auc_test": 0.6}, 0)
    gains, step = batches[-1]
    assert (
        step == 1 and gains["gain_test_auc"] == pytest.approx(0.10) and "gain_finetune_best_step" not in gains
    )
    metrics, tags = gate_record(REGISTRATION)
    assert metrics == {"gate_promote": 1.0, "registered_version": 3.0}
    assert tags["icmil.gate.decision"] == "promote" and tags["icmil.model_version"] == "3"
    with NullTracker().parent():  # no tracking: nothing to do, nothing fails
        log_run_summary(NullTracker(), {"rounds": ROUNDS, "registration": REGISTRATION})


def test_parent_run_carries_the_summary(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "run")
    parent = start_parent_run(cfg, run_name="pipeline")
    path = write_run_summary(tmp_path / "summary", ROUNDS, registration=REGISTRATION)
    summary = {"rounds": ROUNDS, "registration": REGISTRATION}
    log_run_summary(tracker_for(cfg, parent), summary, [path, path.with_name("summary.csv")])
    client = MlflowClient(resolve_tracking_uri(cfg))
    run = client.get_run(parent)
    assert run.data.metrics["round_test_auc"] == 0.75  # the table shows the last round
    assert [m.step for m in client.get_metric_history(parent, "round_test_auc")] == [0, 1]
    assert run.data.metrics["gain_test_auc"] == pytest.approx(0.10)
    assert run.data.metrics["gate_promote"] == 1.0
    assert (
        run.data.tags["icmil.gate.decision"] == "promote"
        and run.data.tags["icmil.gate.reason"] == "beats v2 by 0.05"
    )
    assert {a.path for a in client.list_artifacts(parent)} >= {"summary.json", "summary.csv"}
