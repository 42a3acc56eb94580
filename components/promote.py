"""Move the ``champion`` alias to the ``challenger`` (runs only when the gate's pre-check says it wins)."""

from typing import NamedTuple

from kfp import dsl

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def promote(
    config_yaml: str,
    parent_run_id: str,
) -> NamedTuple("PromoteOutputs", [("promoted", bool), ("reason", str)]):  # type: ignore[valid-type]  # KFP's NamedTuple outputs
    """The gate compares again at promotion time (another run may have promoted meanwhile); a rejection is an
    outcome, not a failure: the aliases stay as they were and the reason is returned (and recorded on the
    MLflow parent run as ``gate_promoted`` and the tag ``icmil.gate.final``)."""
    from collections import namedtuple

    from icmil.config import config_from_yaml
    from icmil.registry import promotion_step
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    promoted, reason = promotion_step(cfg, rt.stage_tracker(cfg, parent_run_id))
    return namedtuple("PromoteOutputs", ["promoted", "reason"])(promoted, reason)  # type: ignore[call-arg,arg-type]
