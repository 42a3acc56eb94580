"""Fan-in of per-shard outputs into one artifact (tiles for later rounds; features for the tune workers).

KFP cannot hand a ``dsl.Collected`` list to tasks inside another ``ParallelFor``, so consumers that run in a
loop (re-embedding shards, tune workers) read this one merged folder instead. Tiles are small (coordinates);
features are merged only when tuning is on.
"""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def merge_shards(parts: Input[list[Artifact]], merged: Output[Artifact]):
    """Copies every shard folder's files into ``merged`` (a slide in two shards is an error)."""
    from icmil.cohort import merge_shard_dirs

    merge_shard_dirs([p.path for p in parts], merged.path)
    merged.metadata["parts"] = len(parts)
