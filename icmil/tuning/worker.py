"""One tuning worker: take trials from the shared study until its budget is spent, train, report, prune.

Any number of workers (processes, pods) may run this on the same study. The budget is exact: a worker takes a
new trial only under the study lock and only while RUNNING + WAITING + COMPLETE + PRUNED trials number fewer
than ``n_trials``; failed trials do not count, and a trial failed because its worker died comes back as a
WAITING copy (same parameters) that the next free worker takes first. A worker with nothing left to take waits
while other trials are still running, so a retry created after a crash is never left behind.

What a trial trains is an :mod:`~icmil.tuning.objective` (the bag head, or stage-2 fine-tuning); it reports
validation AUCs as it goes (the pruner may stop it) and returns one; the test split is never read. Each trial
is an MLflow run nested under the round's ``tune`` run.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmil.errors import ConfigError
from icmil.log import get_logger
from icmil.tracking.base import NullTracker, StageTracker
from icmil.tuning.objective import Objective, make_objective
from icmil.tuning.storage import _quiet_experimental, resolve_storage, study_lock
from icmil.tuning.study import ATTR_N_TRIALS, ATTR_TARGET, ATTR_TUNE_RUN, create_study

if TYPE_CHECKING:
    import optuna

    from icmil.config import ICMILConfig

log = get_logger("tuning")

# Counted against the budget: everything but FAIL.
_BUDGET_STATES = ("RUNNING", "WAITING", "COMPLETE", "PRUNED")


class _Heartbeat:
    """Records the trial's heartbeat every ``interval`` s in a daemon thread while the trial runs."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception as err:  # a database hiccup must not kill the trial; the next beat retries
                log.warning("heartbeat of trial id %d failed: %s", self._trial_id, err)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _next_trial(study: optuna.Study, url: str, budget: int) -> optuna.Trial | None:
    """Under the study lock: fail stale trials (re-queueing them), then take a trial if the budget allows."""
    import optuna
    from optuna.trial import TrialState

    with study_lock(study._storage, url, study.study_name):
        with _quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        used = sum(t.state.name in _BUDGET_STATES for t in trials)
        if not waiting and used >= budget:
            return None
        with warnings.catch_warnings():
            # ask() warns that heartbeats are meant for optimize(): this loop runs its own heartbeat.
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        # Beat once before releasing the lock: a RUNNING trial without any heartbeat is never seen as stale.
        study._storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]
        return trial


def _others_running(study: optuna.Study) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))


def _trial_tracker(tracker: StageTracker | None, tune_run_id: str | None) -> tuple[StageTracker, bool]:
    """(tracker for trial runs, nested?): trials nest under the round's tune run when it was tracked."""
    if tracker is None:
        return NullTracker(), False
    if tune_run_id:
        return tracker.nested(tune_run_id), True
    return tracker, False


def _tell(study: optuna.Study, trial: optuna.Trial, worker_id: int, **kwargs: Any) -> None:
    """Record the trial's end, unless another worker already failed it (it missed heartbeats, e.g. while the
    machine was overloaded): then its re-queued copy stands in for it and this result is dropped."""
    frozen = study.tell(trial, skip_if_finished=True, **kwargs)
    wanted = kwargs.get("state")
    if frozen.state.name == "FAIL" and (wanted is None or wanted.name != "FAIL"):
        log.warning(
            "worker %d: trial %d was failed by another worker (stale heartbeat); its retry replaces it",
            worker_id,
            trial.number,
        )


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    objective: Objective,
    trials_dir: Path,
    trial_tracker: StageTracker,
    nested: bool,
    round_index: int,
    worker_id: int,
) -> None:
    """Train one trial inside its MLflow run and tell the study how it ended (COMPLETE, PRUNED or FAIL)."""
    import optuna
    from optuna.trial import TrialState

    number = trial.number
    frozen = study._storage.get_trial(trial._trial_id)
    with _quiet_experimental():
        retry_of = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    trial.set_user_attr("worker", worker_id)
    tags = {"icmil.study": study.study_name, "icmil.trial": str(number), "icmil.worker": str(worker_id)}
    if retry_of is not None:
        tags["icmil.retry_of"] = str(retry_of)
        log.info("worker %d: trial %d retries trial %d (its worker died)", worker_id, number, retry_of)
    name = f"trial{number}" if nested else f"tune-trial{number}"
    with trial_tracker.stage(name, None if nested else round_index, tags=tags) as run:
        try:
            value = objective(trial, run, trials_dir / f"trial_{number:04d}")
        except optuna.TrialPruned as pruned:
            _tell(study, trial, worker_id, state=TrialState.PRUNED)
            run.set_tags({"icmil.trial_state": "PRUNED"})
            log.info("worker %d: trial %d pruned (%s)", worker_id, number, pruned)
            return
        except BaseException:
            _tell(study, trial, worker_id, state=TrialState.FAIL)
            with contextlib.suppress(Exception):
                run.set_tags({"icmil.trial_state": "FAIL"})
            raise
        _tell(study, trial, worker_id, values=value)
        run.log_metrics({"trial_val_auc": value})
        run.set_tags({"icmil.trial_state": "COMPLETE"})
        log.info("worker %d: trial %d val_auc %.4f %s", worker_id, number, value, trial.params)


def run_tuning_worker(
    cfg: ICMILConfig,
    manifest_csv: str | os.PathLike[str],
    features_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    round_index: int,
    study_name: str,
    n_trials: int | None = None,
    storage: str | None = None,
    tracker: StageTracker | None = None,
    worker_id: int = 0,
    *,
    target: str | None = None,
    tiles_dir: str | os.PathLike[str] | None = None,
    head_dir: str | os.PathLike[str] | None = None,
    encoder_dir: str | os.PathLike[str] | None = None,
) -> int:
    """Run trials of ``study_name`` until the study's budget is spent; return how many this worker ran.

    ``n_trials``: total for the study (default: what :func:`~icmil.tuning.prepare_tuning` stored, else
    ``tuning.n_trials``). ``worker_id`` seeds this worker's sampler differently from the others'. ``target``
    (default: what prepare stored, else ``mil``): ``mil`` needs ``features_dir``; ``coupling`` needs
    ``tiles_dir``, ``head_dir`` (the round's bag head), ``encoder_dir`` (None: the initial encoder) and uses
    ``features_dir`` when given. Trial outputs go to ``out_dir/trials/trial_<number>/``.

    Example:
        >>> n = run_tuning_worker(cfg, "RUN/manifest.csv", "RUN/round_0/features", "RUN/round_0/tune",
        ...                       0, "icmil-demo-round0", worker_id=1)  # doctest: +SKIP
    """
    from icmil.manifest import read_run_manifest

    url = resolve_storage(cfg, storage)
    study = create_study(cfg, study_name, url, seed=cfg.seed + 7919 * worker_id + round_index, target=target)
    stored = study.user_attrs.get(ATTR_TARGET)
    target = target or stored or "mil"
    if stored and stored != target:
        raise ConfigError(f"study {study_name!r} tunes {stored!r}; this worker was asked for {target!r}")
    budget = int(n_trials or study.user_attrs.get(ATTR_N_TRIALS) or cfg.tuning.n_trials)
    manifest = read_run_manifest(cfg, manifest_csv)
    objective = make_objective(
        cfg,
        target,
        manifest,
        manifest_csv=manifest_csv,
        features_dir=features_dir,
        tiles_dir=tiles_dir,
        head_dir=head_dir,
        encoder_dir=encoder_dir,
    )
    trials_dir = Path(out_dir) / "trials"
    trial_tracker, nested = _trial_tracker(tracker, study.user_attrs.get(ATTR_TUNE_RUN))
    poll = min(5.0, float(cfg.tuning.heartbeat_interval))
    ran = 0
    while True:
        trial = _next_trial(study, url, budget)
        if trial is None:
            if _others_running(study):
                time.sleep(poll)  # a trial elsewhere may still fail and come back as a retry
                continue
            break
        ran += 1
        # Heartbeats start before anything slow (MLflow, imports): a silent trial is failed by other workers.
        with _Heartbeat(study._storage, trial._trial_id, cfg.tuning.heartbeat_interval):
            _run_trial(study, trial, objective, trials_dir, trial_tracker, nested, round_index, worker_id)
    return ran
