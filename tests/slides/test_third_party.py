"""Real slides from other tools (openslide-python's own test files): tiled, or refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from icmil.errors import SlideError
from icmil.slides import open_slide, read_tiles, slide_mpp, tile_slide

from .conftest import small_tiling

# These slides are tiny (16 x 16 px Aperio, 300 x 250 px generic TIFF): 16-px patches, mask at slide resolution.
TINY = {"patch_size": 16, "mask_mpp": 0.5, "median_blur": 1, "min_tissue_area_um2": 0, "min_hole_area_um2": 0}


def test_aperio_svs_mpp_from_vendor_metadata(openslide_fixtures: Path, tmp_path: Path) -> None:
    slide = open_slide(openslide_fixtures / "small.svs", "svs")
    assert slide.properties["openslide.vendor"] == "aperio"
    assert slide_mpp(slide, "svs", None) == pytest.approx(0.499)
    info = tile_slide(
        "svs", openslide_fixtures / "small.svs", tmp_path / "svs.h5", small_tiling(target_mpp=0.5, **TINY)
    )
    tiles = read_tiles(tmp_path / "svs.h5")
    assert info.n_patches == len(tiles.coords) == 1  # the one whole 16-px patch
    assert tiles.read_size == 16 and tiles.slide_mpp == pytest.approx(0.499)


def test_generic_tiff_with_placeholder_resolution_needs_the_manifest_mpp(
    openslide_fixtures: Path, tmp_path: Path
) -> None:
    boxes = openslide_fixtures / "boxes.tiff"
    # Its resolution tags hold the 72-dpi placeholder: refused with a pointer to the manifest column.
    with pytest.raises(SlideError, match=r"placeholder.*add an `mpp` column"):
        tile_slide("boxes", boxes, tmp_path / "b.h5", small_tiling(**TINY))
    info = tile_slide(
        "boxes", boxes, tmp_path / "b.h5", small_tiling(target_mpp=0.5, **TINY), mpp_override=0.5
    )
    tiles = read_tiles(tmp_path / "b.h5")
    assert info.n_patches == len(tiles.coords) > 10
    assert (tiles.coords[:, 0] + 16 <= 300).all() and (tiles.coords[:, 1] + 16 <= 250).all()


def test_corrupt_svs_fails_at_the_thumbnail_with_a_clear_error(
    openslide_fixtures: Path, tmp_path: Path
) -> None:
    # Opens fine (its header is intact), but the image data is broken.
    with pytest.raises(SlideError, match=r"reading the thumbnail .* failed: OpenSlideError"):
        tile_slide("bad", openslide_fixtures / "unreadable.svs", tmp_path / "x.h5", small_tiling(**TINY))
    assert not (tmp_path / "x.h5").exists()


def test_unsupported_compression_is_refused_at_open(openslide_fixtures: Path) -> None:
    with pytest.raises(SlideError, match="cannot be read by OpenSlide: Unsupported TIFF compression"):
        open_slide(openslide_fixtures / "unopenable.tiff", "u")


def test_plain_image_is_not_a_slide(openslide_fixtures: Path) -> None:
    # openslide.open_slide() would accept a PNG through PIL; we do not.
    with pytest.raises(SlideError, match="not a slide format OpenSlide can read"):
        open_slide(openslide_fixtures / "boxes.png", "png")
