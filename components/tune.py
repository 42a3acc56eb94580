"""Optuna tuning of a round's bag head, split over tasks: prepare the study, a ParallelFor of workers sharing
it (PostgreSQL storage on a cluster, sqlite in the run folder locally), finish (``best_params.json``).

The worker loop iterates over ``tune_prepare``'s output: each item carries the study name and the parent run
id. (KFP's local runner replaces every task-output parameter that enters a ParallelFor with the loop item, so
the loop body must need nothing but its item and artifacts; on a cluster this shape works just the same.)
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def tune_prepare(
    config_yaml: str, round_index: int, parent_run_id: str, kfp_run_id: str, workers: int
) -> list[str]:
    """Creates the round's study (named after the KFP run) and its budget; returns one assignment per worker."""
    import json

    from icmil.config import config_from_yaml
    from icmil.tuning import prepare_tuning, study_name_for
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    name = study_name_for(cfg, round_index, run_key=kfp_run_id)
    study = prepare_tuning(cfg, name, round_index, tracker=rt.stage_tracker(cfg, parent_run_id))
    return [json.dumps({"study": study, "worker": i, "parent_run_id": parent_run_id}) for i in range(workers)]


@dsl.component(**COMPONENT_OPTIONS)
def tune_worker(
    config_yaml: str,
    round_index: int,
    assignment: str,
    cohort: Input[Dataset],
    features: Input[Artifact],
    trials: Output[Artifact],
) -> str:
    """Runs trials until the study's budget is spent; returns the assignment plus how many trials it ran."""
    import json

    from icmil.config import config_from_yaml
    from icmil.tuning import run_tuning_worker
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    job = json.loads(assignment)
    ran = run_tuning_worker(
        cfg,
        rt.cohort_manifest(cohort.path),
        features.path,
        trials.path,
        round_index,
        job["study"],
        tracker=rt.stage_tracker(cfg, job["parent_run_id"]),
        worker_id=int(job["worker"]),
    )
    return json.dumps({**job, "trials": ran})


@dsl.component(**COMPONENT_OPTIONS)
def tune_finish(
    config_yaml: str,
    round_index: int,
    parent_run_id: str,
    workers_done: list[str],
    best: Output[Artifact],
) -> str:
    """Writes ``best_params.json`` (+ trials.csv, plots) for the round's training step; returns the params.

    ``workers_done`` (the Collected worker results) makes this task wait for every worker."""
    import json

    from icmil.config import config_from_yaml
    from icmil.tuning import finish_tuning
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    done = [json.loads(item) for item in workers_done]
    study = done[0]["study"]
    result = finish_tuning(cfg, best.path, study, round_index, tracker=rt.stage_tracker(cfg, parent_run_id))
    best.metadata.update(
        {
            "study": study,
            "best_value": result.best_value,
            "n_complete": result.n_complete,
            "n_pruned": result.n_pruned,
            "trials_per_worker": [int(d["trials"]) for d in done],
        }
    )
    return json.dumps(result.best_params, sort_keys=True)
