"""Slides: open a slide (local path or ``s3://``), tissue mask, patch grid at a target µm/px, synthetic slides.

Example:
    >>> import tempfile, pathlib
    >>> from icmil.config import SynthConfig, TilingConfig
    >>> from icmil.manifest import read_manifest
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> manifest = read_manifest(synthesize_cohort(d / "synth", SynthConfig(n_slides=2, width=2048, height=1024)))
    >>> report = tile_manifest(manifest, d / "tiles", TilingConfig())
    >>> tiles = read_tiles(d / "tiles" / "slide_000.h5")
    >>> tiles.coords.shape[1], tiles.read_level, tiles.read_size
    (2, 0, 256)
"""

from icmil.slides.access import localize, open_slide, s3_client, slide_digest, slide_mpp, split_s3_uri
from icmil.slides.grid import LevelChoice, choose_read_level, patch_grid
from icmil.slides.mask import Thumbnail, read_thumbnail, thumbnail_level, tissue_mask
from icmil.slides.synth import corrupt_tile, synthesize_cohort, write_synthetic_slide
from icmil.slides.tiling import (
    TileInfo,
    Tiles,
    TilingReport,
    read_tiles,
    tile_manifest,
    tile_slide,
    tiling_settings_digest,
)

__all__ = [
    "LevelChoice",
    "Thumbnail",
    "TileInfo",
    "Tiles",
    "TilingReport",
    "choose_read_level",
    "corrupt_tile",
    "localize",
    "open_slide",
    "patch_grid",
    "read_thumbnail",
    "read_tiles",
    "s3_client",
    "slide_digest",
    "slide_mpp",
    "split_s3_uri",
    "synthesize_cohort",
    "thumbnail_level",
    "tile_manifest",
    "tile_slide",
    "tiling_settings_digest",
    "tissue_mask",
    "write_synthetic_slide",
]
