"""The run summary: per-round metrics table, final evaluation, registered version and the gate's decision."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def report(
    config_yaml: str,
    parent_run_id: str,
    history_json: str,
    registration: Input[Artifact],
    summary: Output[Artifact],
):
    """Writes ``summary.json``, ``summary.csv`` and ``summary.png`` (:func:`icmil.run_summary.write_run_summary`,
    as ``icmil couple`` does) and puts them on the MLflow parent run, with the per-round metrics and the gate's
    decision as the parent run's own metrics and tags."""
    import json

    from icmil.config import config_from_yaml
    from icmil.registry import read_registration
    from icmil.run_summary import SUMMARY_FILES, write_run_summary
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    rounds, registered = json.loads(history_json or "[]"), read_registration(registration.path)
    path = write_run_summary(
        summary.path, rounds, registration=registered, extra={"rounds_planned": cfg.coupling.rounds}
    )
    rt.log_summary_to_parent(
        cfg,
        parent_run_id,
        {"rounds": rounds, "registration": registered},
        [path.with_name(name) for name in SUMMARY_FILES],
    )
