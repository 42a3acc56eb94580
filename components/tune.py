"""Optuna tuning of a round's bag head, split over tasks: prepare the study, a ParallelFor of workers sharing
it (PostgreSQL storage on a cluster, sqlite in the run folder locally), finish (``best_params.json``)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def tune_prepare(config_yaml: str, round_index: int, parent_run_id: str, kfp_run_id: str) -> str:
    """Creates the round's study (named after the KFP run) and its budget; returns the study name."""
    from components import _runtime as rt
    from icmil.tuning import prepare_tuning, study_name_for

    cfg = rt.stage_config(config_yaml)
    name = study_name_for(cfg, round_index, run_key=kfp_run_id)
    return prepare_tuning(cfg, name, round_index, tracker=rt.stage_tracker(cfg, parent_run_id))


@dsl.component(**COMPONENT_OPTIONS)
def tune_worker(
    config_yaml: str,
    round_index: int,
    worker_index: int,
    study_name: str,
    parent_run_id: str,
    cohort: Input[Dataset],
    features: Input[Artifact],
    trials: Output[Artifact],
) -> int:
    """Runs trials until the study's budget is spent; returns how many this worker ran."""
    from components import _runtime as rt
    from icmil.tuning import run_tuning_worker

    cfg = rt.stage_config(config_yaml)
    return run_tuning_worker(
        cfg,
        rt.cohort_manifest(cohort.path),
        features.path,
        trials.path,
        round_index,
        study_name,
        tracker=rt.stage_tracker(cfg, parent_run_id),
        worker_id=int(worker_index),
    )


@dsl.component(**COMPONENT_OPTIONS)
def tune_finish(
    config_yaml: str,
    round_index: int,
    study_name: str,
    parent_run_id: str,
    trials_per_worker: list[int],
    best: Output[Artifact],
) -> str:
    """Writes ``best_params.json`` (+ trials.csv, plots) for the round's training step; returns the params."""
    import json

    from components import _runtime as rt
    from icmil.tuning import finish_tuning

    cfg = rt.stage_config(config_yaml)
    result = finish_tuning(
        cfg, best.path, study_name, round_index, tracker=rt.stage_tracker(cfg, parent_run_id)
    )
    best.metadata.update(
        {
            "best_value": result.best_value,
            "n_complete": result.n_complete,
            "n_pruned": result.n_pruned,
            # Collected ints arrive as floats from the local runner.
            "trials_per_worker": [int(n) for n in trials_per_worker],
        }
    )
    return json.dumps(result.best_params, sort_keys=True)
