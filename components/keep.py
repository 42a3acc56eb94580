"""A coupling round whose stage 2 kept the teacher: record the model round's evaluation for this round, marked
``teacher_kept`` (nothing is re-embedded or retrained; the pipeline's other branch does that when a student won)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def keep_teacher(
    config_yaml: str,
    round_index: int,
    parent_run_id: str,
    history_json: str,
    model_evaluation: Input[Artifact],
    encoder: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
) -> NamedTuple("EvaluateOutputs", [("history_json", str), ("metric", float)]):  # type: ignore[valid-type]  # KFP's NamedTuple outputs
    """``model_evaluation``: the evaluation of the round whose features and head this round reuses;
    ``encoder``: this round's stage-2 output (its ``finetune.json`` adds the stage-2 summary to the row).
    Returns what ``evaluate`` returns: the per-round table with this round's row, and the promotion metric."""
    from icmil.config import config_from_yaml
    from icmil.stages import keep_teacher_stage
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    result = keep_teacher_stage(
        cfg,
        model_evaluation.path,
        encoder.path,
        evaluation.path,
        round_index,
        tracker=rt.stage_tracker(cfg, parent_run_id),
    )
    return rt.round_outputs(cfg, metrics, history_json, round_index, result)
