"""Work per slide is bounded: a tiny file whose header claims a huge image is reported as corrupt in
milliseconds, and a slide without a small enough level is refused instead of being read whole for the mask."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from icmil.cli import main
from icmil.config import TilingConfig
from icmil.errors import SlideError
from icmil.slides import open_slide, read_thumbnail, thumbnail_level, tile_slide

from .conftest import small_tiling


def lying_tiff(path: Path, side: int = 60000, tile: int = 1024) -> Path:
    """A valid tiled TIFF of ``side`` x ``side`` px at 0.5 µm/px whose every tile entry points at the same
    single compressed tile: ~0.1 MB on disk claiming gigapixels (what a corrupt or forged header looks like)."""
    per_side = -(-side // tile)
    n = per_side * per_side
    data = zlib.compress(np.full((tile, tile, 3), 240, np.uint8).tobytes(), 9)
    tile_at = 8
    bits_at = tile_at + len(data)
    xres_at = bits_at + 6
    yres_at = xres_at + 8
    offsets_at = yres_at + 8
    counts_at = offsets_at + 4 * n
    ifd_at = counts_at + 4 * n
    short, long_, rational = 3, 4, 5

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        if kind == short and count == 1:
            return struct.pack("<HHIHH", tag, kind, count, value, 0)
        return struct.pack("<HHII", tag, kind, count, value)

    entries = [
        entry(256, long_, 1, side),
        entry(257, long_, 1, side),
        entry(258, short, 3, bits_at),
        entry(259, short, 1, 8),  # deflate
        entry(262, short, 1, 2),  # RGB
        entry(277, short, 1, 3),
        entry(282, rational, 1, xres_at),
        entry(283, rational, 1, yres_at),
        entry(284, short, 1, 1),
        entry(296, short, 1, 3),  # centimetre
        entry(322, long_, 1, tile),
        entry(323, long_, 1, tile),
        entry(324, long_, n, offsets_at),
        entry(325, long_, n, counts_at),
    ]
    with path.open("wb") as fh:
        fh.write(b"II*\x00" + struct.pack("<I", ifd_at))
        fh.write(data)
        fh.write(struct.pack("<HHH", 8, 8, 8))
        fh.write(struct.pack("<II", 20000, 1) * 2)  # 20000 px/cm = 0.5 µm/px
        fh.write(struct.pack(f"<{n}I", *([tile_at] * n)))
        fh.write(struct.pack(f"<{n}I", *([len(data)] * n)))
        fh.write(struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0))
    return path


def test_a_tiny_file_claiming_60000_px_is_reported_corrupt_quickly(tmp_path: Path) -> None:
    slide = lying_tiff(tmp_path / "liar.tiff")
    assert slide.stat().st_size < 200_000
    handle = open_slide(slide, "liar")  # OpenSlide itself accepts it
    assert handle.dimensions == (60000, 60000)
    handle.close()
    manifest = tmp_path / "m.csv"
    good = tmp_path / "good.tiff"
    from icmil.config import SynthConfig
    from icmil.slides import write_synthetic_slide

    write_synthetic_slide(good, SynthConfig(), seed=2, positive=False, width=2048, height=1536)
    manifest.write_text(f"slide_id,path,label\nliar,{slide},tumor\ngood,{good},normal\n")
    t0 = time.perf_counter()
    rc = main(
        [
            "tile",
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "tiles"),
            "--set",
            "tiling.max_failed_fraction=0.5",
            "--set",
            "val_fraction=0",
            "--set",
            "test_fraction=0",
        ]
    )
    seconds = time.perf_counter() - t0
    assert rc == 0 and seconds < 30  # it took 135 s before the bounds (most of this is the good slide)
    status = pd.read_csv(tmp_path / "tiles" / "status.csv").set_index("slide_id")
    why = status.loc["liar", "error"]
    assert status.loc["liar", "status"] == "error" and status.loc["liar", "seconds"] < 2
    assert "corrupt slide" in why and "claims 60000x60000 px (3.6 Gpx)" in why
    assert status.loc["good", "status"] == "ok"


def test_a_slide_without_a_small_level_is_refused_not_read_whole(tmp_path: Path) -> None:
    slide = lying_tiff(tmp_path / "flat.tiff", side=20480)
    # Plausibility off: only the mask budget stands between this slide and reading 419 Mpx for a thumbnail.
    cfg = small_tiling(max_pixels_per_byte=1e9)
    t0 = time.perf_counter()
    with pytest.raises(SlideError, match=r"no pyramid level small enough .*20480x20480 px \(419 Mpx"):
        tile_slide("flat", slide, tmp_path / "flat.h5", cfg)
    assert time.perf_counter() - t0 < 2
    assert not (tmp_path / "flat.h5").exists()


def test_the_mask_level_respects_the_pixel_budget(tmp_path: Path) -> None:
    from icmil.config import SynthConfig
    from icmil.slides import write_synthetic_slide

    path = tmp_path / "s.tiff"
    write_synthetic_slide(path, SynthConfig(), seed=1, positive=False, width=4096, height=3072)
    slide = open_slide(path, "s")
    pixels = [w * h for w, h in slide.level_dimensions]  # 12.6 M, 786 k, 49 k
    # At 0.5 µm/px the best level for a 0.5 µm/px mask is level 0; a 1 Mpx budget moves it to level 1.
    assert thumbnail_level(slide.level_downsamples, 0.5, 0.5) == 0
    assert thumbnail_level(slide.level_downsamples, 0.5, 0.5, pixels, 1_000_000) == 1
    thumb = read_thumbnail(slide, 0.5, 0.5, max_pixels=1_000_000)
    assert thumb.level == 1 and thumb.rgb.shape[:2] == (768, 1024)
    with pytest.raises(ValueError, match="budget for the tissue mask"):
        read_thumbnail(slide, 0.5, 0.5, max_pixels=10_000)
    slide.close()


def test_the_bounds_keep_existing_tiles_valid() -> None:
    from icmil.slides import tiling_settings_digest

    base = tiling_settings_digest(TilingConfig())
    assert tiling_settings_digest(TilingConfig(max_failed_fraction=0.5)) == base
    assert tiling_settings_digest(TilingConfig(mask_max_pixels=10_000_000)) != base
