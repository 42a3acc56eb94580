"""Evaluate a round's bag head on val and test (slide metrics, patch-level AUC against lesion boxes)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def evaluate(
    config_yaml: str,
    round_index: int,
    parent_run_id: str,
    history_json: str,
    cohort: Input[Dataset],
    features: Input[list[Artifact]],
    head: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    encoder: Input[Model] | None = None,
) -> NamedTuple("EvaluateOutputs", [("history_json", str), ("metric", float)]):  # type: ignore[valid-type]  # KFP's NamedTuple outputs
    """Appends the round's row to the per-round table ``history_json``; ``metric`` is the promotion metric
    (``tracking.promotion_split`` + ``tracking.promotion_metric``). ``encoder``: the round's fine-tuned encoder
    (its ``finetune.json`` adds the stage-2 summary to the row)."""
    from icmil.cohort import cohort_lesions
    from icmil.config import config_from_yaml
    from icmil.stages import evaluate_stage
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    with rt.merged_view([f.path for f in features]) as features_dir:
        result = evaluate_stage(
            cfg,
            rt.cohort_manifest(cohort.path),
            features_dir,
            head.path,
            evaluation.path,
            round_index,
            tracker=rt.stage_tracker(cfg, parent_run_id),
            lesions_json=cohort_lesions(cohort.path),
            finetune_dir=encoder.path if encoder else None,
        )
    return rt.round_outputs(cfg, metrics, history_json, round_index, result)
