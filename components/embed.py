"""Embed one shard of slides with the round's encoder (the initial one in round 0, else the fine-tuned one)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def embed(
    config_yaml: str,
    shard: str,
    round_index: int,
    tiles: Input[Artifact],
    encoder: Input[Model],
    features: Output[Artifact],
    cohort: Input[Dataset] | None = None,
):
    """Features HDF5 per slide of the shard (CLAM/TRIDENT layout), keyed by slide and encoder digest."""
    from icmil.config import config_from_yaml
    from icmil.stages import embed_stage
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    with rt.shard_inputs(shard, cohort.path if cohort else None) as (manifest_csv, slide_ids):
        result = embed_stage(
            cfg, manifest_csv, tiles.path, encoder.path, features.path, round_index, shard=slide_ids
        )
    features.metadata.update(rt.metadata(result))
