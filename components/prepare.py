"""Manifest step: synthesise a cohort (no manifest given) or read the manifest, split once, cut into shards."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from icmil_kfp.components._base import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def prepare(config_yaml: str, manifest: str, n_shards: int, cohort: Output[Dataset]) -> list[str]:
    """Writes the cohort folder (resolved manifest.csv [+ synthetic slides]); returns the shards (JSON each).

    The shard list is the single return value: the local runner's ParallelFor reads only an ``Output`` list.
    The manifest digest, slide count and classes are in the cohort artifact's metadata.
    """
    from icmil.cohort import prepare_cohort
    from icmil.config import config_from_yaml

    result = prepare_cohort(
        config_from_yaml(config_yaml), cohort.path, n_shards=n_shards, manifest=manifest or None
    )
    cohort.metadata.update(
        {
            "manifest_digest": result.manifest_digest,
            "n_slides": result.n_slides,
            "n_shards": len(result.shards),
            "classes": result.classes,
            "rejected_rows": len(result.errors),
            "synthetic": result.synthetic,
        }
    )
    return [s.to_json() for s in result.shards]
