"""Materialise the round-0 encoder once (configured weights or seeded random init, optionally with BatchNorm
statistics calibrated on training patches) so every later task - each embedding shard and the round-1
teacher - loads exactly the same weights."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def initial_encoder(
    config_yaml: str,
    encoder: Output[Model],
    cohort: Input[Dataset] | None = None,
    tiles: Input[Artifact] | None = None,
) -> NamedTuple("EncoderOutputs", [("encoder_digest", str)]):  # type: ignore[valid-type]  # KFP's NamedTuple outputs
    """``cohort`` + ``tiles`` only with ``coupling.initial_bn_calibration``; returns the encoder digest."""
    from collections import namedtuple

    from icmil.config import config_from_yaml
    from icmil.stages import encoder_stage
    from icmil_kfp.components import _runtime as rt

    # Without BatchNorm calibration the stage reads neither the manifest nor the tiles: None is fine there.
    manifest_csv = rt.cohort_manifest(cohort.path) if cohort else None
    tiles_dir = tiles.path if tiles else None
    cfg = config_from_yaml(config_yaml)
    result = encoder_stage(cfg, manifest_csv, tiles_dir, encoder.path)
    encoder.metadata.update(rt.metadata(result))
    return namedtuple("EncoderOutputs", ["encoder_digest"])(str(result.get("encoder_digest", "")))
