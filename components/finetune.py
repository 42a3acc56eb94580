"""Fine-tune the patch encoder (ICMIL stage 2): the previous round's bag head becomes the instance teacher."""

from typing import NamedTuple

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
    features: Input[list[Artifact]],
    encoder: Output[Model],
    metrics: Output[Metrics],
) -> NamedTuple("FinetuneOutputs", [("encoder_digest", str)]):  # type: ignore[valid-type]  # KFP's NamedTuple outputs
    """Teacher = (``previous_encoder``, ``head``) of round k-1; ``features`` are what that encoder made."""
    from collections import namedtuple

    from icmil.config import config_from_yaml
    from icmil.stages import finetune_stage
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    with rt.merged_view([f.path for f in features]) as features_dir:
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
    return namedtuple("FinetuneOutputs", ["encoder_digest"])(str(result.get("encoder_digest") or ""))
