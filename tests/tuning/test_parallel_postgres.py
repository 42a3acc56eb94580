"""Workers in separate processes sharing one study on a real PostgreSQL: exact budget, pruning, MLflow trial
runs nested under the round's tune run, and a killed worker's trial failed by its stale heartbeat and retried."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from icmil.config import config_to_yaml
from icmil.tuning import create_study, finish_tuning, prepare_tuning, run_tuning_worker
from tests.tuning.conftest import tuning_cfg

ROOT = Path(__file__).resolve().parents[2]
GOOD, BAD = {"lr": 0.05, "dropout": 0.0}, {"lr": 1e-6, "dropout": 0.0}


def _spawn(
    cfg_file: Path, cohort: Path, out: Path, study: str, worker: int, parent: str = ""
) -> subprocess.Popen:
    args = [str(cfg_file), str(cohort), str(cohort.parent / "features"), str(out), "0", study, str(worker)]
    env = {**os.environ, "ICMIL_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.tuning.worker_proc", *args, *([parent] if parent else [])],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.servers
def test_two_worker_processes_share_one_study(tmp_path, cohort, postgres_url):
    from mlflow import MlflowClient

    from icmil.tracking import start_parent_run, tracker_for

    storage = postgres_url()
    cfg = tuning_cfg(
        tmp_path, f"tuning.storage={storage}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"
    )
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(config_to_yaml(cfg, redact=False))  # passed to another process: exact text
    parent = start_parent_run(cfg, run_name="tuning-test")
    tracker = tracker_for(cfg, parent)
    study_name = "icmil-parallel-round0"
    prepare_tuning(cfg, study_name, 0, n_trials=4, tracker=tracker)
    # Fixed settings make pruning independent of timing: the last (bad) trial is taken after two of the first
    # three finished, at least one of them good, so it falls below the median at epoch 1 and is pruned.
    study = create_study(cfg, study_name)
    for params in (GOOD, BAD, GOOD, BAD):
        study.enqueue_trial(params)

    out = tmp_path / "tune"
    workers = [_spawn(cfg_file, cohort, out, study_name, w, parent) for w in (0, 1)]
    logs = [w.communicate(timeout=240)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(log[-3000:] for log in logs)
    ran = [int(log.rsplit("ran=", 1)[1].split()[0]) for log in logs]
    assert sum(ran) == 4 and min(ran) >= 1, ran

    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(4))  # nothing lost, nothing duplicated
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert sorted(t.user_attrs["worker"] for t in trials) == sorted([0] * ran[0] + [1] * ran[1])
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(pruned) >= 1 and all(t.params["lr"] == BAD["lr"] for t in pruned)

    result = finish_tuning(cfg, out, study_name, 0, tracker=tracker)
    assert result.n_complete + result.n_pruned == 4 and result.best_params == GOOD

    client = MlflowClient(cfg.tracking.tracking_uri)
    tune_run_id = study.user_attrs["icmil.tune_run_id"]
    tune_run = client.get_run(tune_run_id)
    assert tune_run.data.tags["mlflow.parentRunId"] == parent and tune_run.info.run_name == "round0/tune"
    assert float(tune_run.data.params["best.lr"]) == GOOD["lr"]
    assert tune_run.data.metrics["n_pruned"] == len(pruned)
    artifacts = {a.path for a in client.list_artifacts(tune_run_id, "tuning")}
    assert {"tuning/best_params.json", "tuning/optimization_history.png"} <= artifacts
    children = client.search_runs(
        [tune_run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tune_run_id}'"
    )
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {f"trial{n}" for n in range(4)}
    for t in trials:
        run = by_name[f"trial{t.number}"]
        assert run.data.tags["icmil.trial_state"] == t.state.name and run.info.status == "FINISHED"
        assert float(run.data.params["lr"]) == t.params["lr"]
        assert len(client.get_metric_history(run.info.run_id, "val_auc")) == len(t.intermediate_values)


@pytest.mark.servers
def test_killed_worker_trial_fails_by_heartbeat_and_is_retried(tmp_path, cohort, postgres_url):
    storage = postgres_url()
    # The doomed worker trains long enough to be killed mid-trial; the survivor's trials are short.
    slow = tuning_cfg(tmp_path, f"tuning.storage={storage}", "tuning.epochs=500", "mil.patience=null")
    fast = tuning_cfg(tmp_path, f"tuning.storage={storage}", "tuning.epochs=2")
    cfg_file = tmp_path / "slow.yaml"
    cfg_file.write_text(config_to_yaml(slow, redact=False))
    study_name = "icmil-heartbeat-round0"
    prepare_tuning(fast, study_name, 0, n_trials=1)
    out = tmp_path / "tune"
    doomed = _spawn(cfg_file, cohort, out, study_name, 0)
    study = create_study(fast, study_name)
    deadline = time.monotonic() + 120
    try:
        # Mid-trial: the trial is RUNNING and has finished at least one epoch.
        while not (out / "trials" / "trial_0000" / "history.csv").is_file():
            assert doomed.poll() is None, doomed.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the worker never got into its trial"
            time.sleep(0.2)
        assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.communicate()

    # The survivor sees the budget used by a RUNNING trial, waits, fails it once its heartbeat is stale and
    # runs the re-queued copy.
    ran = run_tuning_worker(fast, cohort, cohort.parent / "features", out, 0, study_name, worker_id=1)
    assert ran == 1
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) and retry.params == first.params
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == first.number
    assert retry.user_attrs["worker"] == 1
    result = finish_tuning(fast, out, study_name, 0)
    assert (result.n_complete + result.n_pruned, result.n_failed) == (1, 1)
