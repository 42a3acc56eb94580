"""Train the round's bag head (ICMIL stage 1) on the round's features."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def train_head(
    config_yaml: str,
    round_index: int,
    parent_run_id: str,
    cohort: Input[Dataset],
    features: Input[list[Artifact]],
    head: Output[Model],
    metrics: Output[Metrics],
    tuned: Input[Artifact] | None = None,
):
    """``tuned``: the round's ``best_params.json`` (Optuna) overriding ``mil`` settings; absent = the config."""
    from icmil.cohort import cohort_lesions
    from icmil.config import config_from_yaml
    from icmil.stages import train_stage
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    with rt.merged_view([f.path for f in features]) as features_dir:
        result = train_stage(
            cfg,
            rt.cohort_manifest(cohort.path),
            features_dir,
            head.path,
            round_index,
            tracker=rt.stage_tracker(cfg, parent_run_id),
            params=rt.tuned_params(tuned.path if tuned else None),
            lesions_json=cohort_lesions(cohort.path),
        )
    rt.log_kfp_metrics(metrics, result.get("metrics", {}))
    head.metadata.update(rt.metadata(result))
