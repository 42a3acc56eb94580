"""Fine-tune the patch encoder (ICMIL stage 2): the previous round's bag head becomes the instance teacher."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def finetune(
    config_yaml: str,
    round_index: int,
    parent_run_id: str,
    cohort: Input[Dataset],
    tiles: Input[Artifact],
    previous_encoder: Input[Model],
    head: Input[Model],
    encoder: Output[Model],
    metrics: Output[Metrics],
    features: Input[list[Artifact]] | None = None,
    merged_features: Input[Artifact] | None = None,
) -> bool:
    """Teacher = round k-1's ``previous_encoder`` with the model round's ``head``; ``features`` (the shards) or
    ``merged_features`` (one folder) are what that encoder made. Returns True when no student beat the teacher (selected step 0): the pipeline then neither
    re-embeds nor retrains (the return value is this task's only output parameter because the local runner
    resolves a ``dsl.If`` condition only on ``Output``)."""
    from icmil.config import config_from_yaml
    from icmil.rounds.wiring import teacher_kept
    from icmil.stages import finetune_stage
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    parts = [merged_features.path] if merged_features is not None else [f.path for f in features or []]
    with rt.merged_view(parts) as features_dir:
        result = finetune_stage(
            cfg,
            rt.cohort_manifest(cohort.path),
            tiles.path,
            previous_encoder.path,
            head.path,
            features_dir,
            encoder.path,
            round_index,
            tracker=rt.stage_tracker(cfg, parent_run_id),
        )
    rt.log_kfp_metrics(metrics, result)
    encoder.metadata.update(rt.metadata(result))
    return teacher_kept(result)
