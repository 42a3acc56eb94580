"""Materialise the round-0 encoder once (configured weights or seeded random init) so every later task — each
embedding shard and the round-1 teacher — loads exactly the same weights."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Model, Output

from components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def initial_encoder(config_yaml: str, encoder: Output[Model]) -> NamedTuple(  # type: ignore[valid-type]  # KFP's NamedTuple outputs
    "EncoderOutputs", [("encoder_digest", str)]
):
    """Writes ``weights.safetensors`` + ``config.json``; returns the encoder digest (part of feature keys)."""
    from collections import namedtuple

    from components import _runtime as rt
    from icmil.stages import encoder_stage

    result = encoder_stage(rt.stage_config(config_yaml), encoder.path)
    encoder.metadata.update(rt.metadata(result))
    return namedtuple("EncoderOutputs", ["encoder_digest"])(str(result.get("encoder_digest", "")))
