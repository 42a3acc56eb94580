"""Tile one shard of slides: tissue mask and patch grid per slide (coordinates only, no pixels copied)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def tile(config_yaml: str, shard: str, tiles: Output[Artifact], cohort: Input[Dataset] | None = None):
    """``shard`` carries the slides' manifest rows and fingerprints (the cache key); ``cohort`` is given only
    for a synthetic cohort, whose slides live in that artifact."""
    from icmil.config import config_from_yaml
    from icmil.stages import tile_stage
    from icmil_kfp.components import _runtime as rt

    cfg = config_from_yaml(config_yaml)
    with rt.shard_inputs(shard, cohort.path if cohort else None) as (manifest_csv, slide_ids):
        result = tile_stage(cfg, manifest_csv, tiles.path, shard=slide_ids)
    tiles.metadata.update(rt.metadata(result))
