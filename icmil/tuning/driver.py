"""A round's tuning from start to end: prepare the study, run worker(s), write and log the result.

Local (``icmil tune``; ``icmil couple`` through :func:`tune_stage`): :func:`tune_round` does all three in one
process. Pipeline: a ``prepare`` task (:func:`prepare_tuning`), a ``ParallelFor`` of GPU tasks each running
:func:`~icmil.tuning.worker.run_tuning_worker` on the same study (PostgreSQL storage), then a ``finish`` task
(:func:`finish_tuning`) whose ``best_params.json`` feeds the round's training step. Several ``icmil tune``
processes started on one study name and one PostgreSQL storage cooperate the same way.

Example:
    >>> result = tune_round(cfg, "RUN/manifest.csv", "RUN/round_0/features", "RUN/round_0/tune", 0)  # doctest: +SKIP
    >>> result.best_params, result.n_complete, result.n_pruned  # doctest: +SKIP
    ({'attention_dim': 71, 'dropout': 0.08, 'lr': 0.00042, 'weight_decay': 1.3e-05}, 5, 3)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmil.config import dump_config
from icmil.errors import ConfigError
from icmil.log import get_logger
from icmil.tracking.base import NullTracker, StageTracker
from icmil.tracking.uris import redact_uri
from icmil.tuning.objective import TARGETS
from icmil.tuning.report import BEST_PARAMS_FILE, write_best_params, write_plots, write_trials_csv
from icmil.tuning.space import validate_space
from icmil.tuning.storage import _quiet_experimental, resolve_storage
from icmil.tuning.study import (
    ATTR_N_TRIALS,
    ATTR_ROUND,
    ATTR_TARGET,
    ATTR_TUNE_RUN,
    OBJECTIVE,
    best_params_of,
    create_study,
    study_name_for,
    trial_counts,
)
from icmil.tuning.worker import run_tuning_worker

if TYPE_CHECKING:
    from icmil.config import ICMILConfig

log = get_logger("tuning")

TUNE_STAGE = "tune"


def tune_stage_name(target: str) -> str:
    """MLflow child-run name of a round's study: ``tune`` (bag head) or ``tune-coupling`` (stage 2)."""
    return TUNE_STAGE if target == "mil" else f"{TUNE_STAGE}-{target}"


@dataclass(frozen=True)
class TuneResult:
    """The outcome of one round's study. ``best_params`` override MILConfig fields in the training step
    (``target="mil"``) or the stage-2 settings (``target="coupling"``, via ``apply_params``)."""

    best_params: dict[str, Any]
    best_value: float
    n_complete: int
    n_pruned: int
    n_failed: int = 0
    study_name: str = ""
    target: str = "mil"
    best_trial: int = -1
    best_params_path: Path | None = None
    plots: list[Path] = field(default_factory=list)


def prepare_tuning(
    cfg: ICMILConfig,
    study_name: str,
    round_index: int,
    n_trials: int | None = None,
    storage: str | None = None,
    tracker: StageTracker | None = None,
    target: str = "mil",
) -> str:
    """Create (or load) the study, store its budget, target and the round's MLflow ``tune`` run id; return its name.

    Doing this once before the workers start means they agree on the budget and the target and nest their trial
    runs under one ``round<r>/tune`` run instead of racing to create it.
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown tuning target {target!r} (choose from {', '.join(TARGETS)})")
    validate_space(cfg.tuning.mil_space if target == "mil" else cfg.tuning.coupling_space, target)
    url = resolve_storage(cfg, storage)
    study = create_study(cfg, study_name, url, target=target)
    if study.user_attrs.get(ATTR_TARGET) != target:
        raise ConfigError(
            f"study {study_name!r} already tunes {study.user_attrs.get(ATTR_TARGET)!r}, not {target!r}: "
            "use another study name"
        )
    budget = int(n_trials or cfg.tuning.n_trials)
    previous = study.user_attrs.get(ATTR_N_TRIALS)
    if previous is not None and int(previous) != budget:
        log.info("study %s: budget changes from %s to %d trials", study_name, previous, budget)
    study.set_user_attr(ATTR_N_TRIALS, budget)
    study.set_user_attr(ATTR_ROUND, round_index)
    stage = tune_stage_name(target)
    with (tracker or NullTracker()).stage(stage, round_index, tags={"icmil.study": study_name}) as run:
        if run.run_id:
            study.set_user_attr(ATTR_TUNE_RUN, run.run_id)
        run.log_params(
            {"study": study_name, "target": target, "n_trials": budget, "trial_epochs": cfg.tuning.epochs}
        )
        run.log_params(
            {"pruner": cfg.tuning.pruner, "sampler": cfg.tuning.sampler, "storage": redact_uri(url)}
        )
    log.info("study %s at %s: %d trials", study_name, redact_uri(url), budget)
    return study_name


def finish_tuning(
    cfg: ICMILConfig,
    out_dir: str | os.PathLike[str],
    study_name: str,
    round_index: int,
    storage: str | None = None,
    tracker: StageTracker | None = None,
) -> TuneResult:
    """Write ``best_params.json``, ``trials.csv`` and the plots to ``out_dir``; log them on the round's tune run.

    Raises :class:`~icmil.tuning.study.NoCompletedTrial` when no trial completed.
    """
    import optuna

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = resolve_storage(cfg, storage)
    study = create_study(cfg, study_name, url)
    with _quiet_experimental():
        optuna.storages.fail_stale_trials(study)  # a worker that died after the others finished
    target = str(study.user_attrs.get(ATTR_TARGET, "mil"))
    counts = trial_counts(study)
    params = best_params_of(study)
    best = study.best_trial
    assert best.value is not None  # a COMPLETE trial always has a value
    summary = {
        "study": study_name,
        "target": target,
        "round": round_index,
        "objective": OBJECTIVE,
        "direction": "maximize",
        "best_value": best.value,
        "best_trial": best.number,
        "params": params,
        "counts": counts,
        "trial_epochs": cfg.tuning.epochs,
        "storage": redact_uri(url),
    }
    path = write_best_params(out / BEST_PARAMS_FILE, summary)
    trials_csv = write_trials_csv(study, out / "trials.csv")
    plots = write_plots(study, out)
    dump_config(cfg, out)
    stage = tune_stage_name(target)
    with (tracker or NullTracker()).stage(stage, round_index, tags={"icmil.study": study_name}) as run:
        run.log_params({f"best.{k}": v for k, v in params.items()})
        run.log_metrics(
            {
                f"best_{OBJECTIVE}": float(best.value),
                "best_trial": float(best.number),
                "n_complete": float(counts["complete"]),
                "n_pruned": float(counts["pruned"]),
                "n_failed": float(counts["fail"]),
            }
        )
        for artifact in (path, trials_csv, *plots):
            run.log_artifact(artifact, "tuning")
    log.info(
        "study %s: best val_auc %.4f (trial %d) %s; %d complete, %d pruned, %d failed",
        study_name,
        best.value,
        best.number,
        params,
        counts["complete"],
        counts["pruned"],
        counts["fail"],
    )
    return TuneResult(
        best_params=params,
        best_value=float(best.value),
        n_complete=counts["complete"],
        n_pruned=counts["pruned"],
        n_failed=counts["fail"],
        study_name=study_name,
        target=target,
        best_trial=best.number,
        best_params_path=path,
        plots=plots,
    )


def tune_round(
    cfg: ICMILConfig,
    manifest_csv: str | os.PathLike[str],
    features_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    round_index: int = 0,
    study_name: str | None = None,
    n_trials: int | None = None,
    tracker: StageTracker | None = None,
    storage: str | None = None,
    *,
    target: str = "mil",
    tiles_dir: str | os.PathLike[str] | None = None,
    head_dir: str | os.PathLike[str] | None = None,
    encoder_dir: str | os.PathLike[str] | None = None,
) -> TuneResult:
    """Tune round ``round_index``: prepare the study, run its trials here, finish.

    ``target="mil"`` (default) tunes the bag head on ``features_dir``; ``target="coupling"`` tunes stage 2
    (teacher = ``encoder_dir`` (None: the initial encoder) + ``head_dir``, patches from ``tiles_dir``,
    ``features_dir`` = that encoder's features) and its ``best_params.json`` feeds
    ``apply_params(cfg, params, target="coupling")`` before the round's fine-tuning stage.

    ``study_name`` defaults to :func:`~icmil.tuning.study.study_name_for` (run folder + round); ``n_trials`` to
    ``tuning.n_trials``; ``storage`` to :func:`~icmil.tuning.storage.resolve_storage`. Rerunning resumes the
    study: finished trials count, only the missing ones run. Outputs: ``out_dir/best_params.json`` (its
    ``params`` override MILConfig fields in the round's training step), ``trials.csv``, plots, and
    ``trials/trial_<n>/`` (each trial's training output).
    """
    name = study_name or study_name_for(cfg, round_index, target=target)
    prepare_tuning(cfg, name, round_index, n_trials=n_trials, storage=storage, tracker=tracker, target=target)
    run_tuning_worker(
        cfg,
        manifest_csv,
        features_dir,
        out_dir,
        round_index,
        name,
        n_trials=n_trials,
        storage=storage,
        tracker=tracker,
        target=target,
        tiles_dir=tiles_dir,
        head_dir=head_dir,
        encoder_dir=encoder_dir,
    )
    return finish_tuning(cfg, out_dir, name, round_index, storage=storage, tracker=tracker)


def tune_stage(
    cfg: ICMILConfig,
    manifest_csv: str | os.PathLike[str],
    features_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    round_index: int,
    tracker: StageTracker | None = None,
) -> dict[str, Any]:
    """Round ``round_index``'s bag-head study as a resumable stage (``icmil couple`` with ``tuning.enabled``):
    :func:`tune_round` into ``out_dir``, finished when its marker ``out_dir/stage.json`` exists (a finished
    study is not rerun). Returns the marker's record; ``best_params`` feed the round's training stage.

    The pipeline runs the same study as three tasks (prepare, a ParallelFor of workers, finish) instead.
    """
    import time

    from icmil.stages import finished_result, marker_path, write_marker

    marker = marker_path(out_dir)
    if (done := finished_result(marker, TUNE_STAGE, round_index)) is not None:
        return done
    t0 = time.perf_counter()
    result = tune_round(cfg, manifest_csv, features_dir, out_dir, round_index, tracker=tracker)
    record = {
        "study": result.study_name,
        "best_params": result.best_params,
        "best_value": result.best_value,
        "n_complete": result.n_complete,
        "n_pruned": result.n_pruned,
        "n_failed": result.n_failed,
    }
    return write_marker(marker, TUNE_STAGE, round_index, cfg, record, t0)
