"""Register the coupled model (final encoder + bag head + tiling settings, an MLflow pyfunc slide classifier)
as the new ``challenger`` version, and pre-check it against the ``champion``: that comparison is the
condition of the promotion gate (``dsl.If``)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def register(
    config_yaml: str,
    parent_run_id: str,
    cohort: Input[Dataset],
    encoder: Input[Model],
    head: Input[Model],
    evaluation: Input[Artifact],
    registration: Output[Artifact],
) -> bool:
    """Returns True when the challenger would beat the champion (or reach the floor, first version).

    The decision is the single return value because the local runner resolves a ``dsl.If`` condition only
    on an ``Output`` parameter; the version and the reason are in ``registration/registration.json``.
    """
    from icmil.config import config_from_yaml
    from icmil.registry import register_run_model, write_registration
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    done = register_run_model(
        cfg,
        rt.cohort_manifest(cohort.path),
        encoder.path,
        head.path,
        evaluation.path,
        parent_run_id=parent_run_id,
        tracker=rt.stage_tracker(cfg, parent_run_id),
    )
    registration.metadata.update(write_registration(registration.path, done))
    return done.promote
