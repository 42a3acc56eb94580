"""Deep Zoom pyramids of slides and per-patch score overlays, for the report's zoomable viewer.

A pyramid is the standard Deep Zoom layout (``<name>_files/<level>/<col>_<row>.jpeg``, tiles of 254 px with
1 px overlap) cut by OpenSlide's ``DeepZoomGenerator``, up to the level whose larger side is at most
``max_dim`` px, so a 100 000-px slide gives a report of a few MB. The overlay is one RGBA image with one
block of pixels per patch position (transparent where there is no patch), on an absolute colour scale.

Example:
    >>> import numpy as np, tempfile
    >>> from pathlib import Path
    >>> o = write_overlay(np.array([[0, 0], [256, 0]]), np.array([0.1, 0.9]), 256, (1024, 512),
    ...                   Path(tempfile.mkdtemp()) / "o.png")
    >>> o.cols, o.rows, round(o.width_fraction, 2)
    (4, 2, 1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TILE_SIZE = 254
OVERLAP = 1


@dataclass(frozen=True)
class Pyramid:
    """A written Deep Zoom pyramid: the inline OpenSeadragon tile source needs exactly these fields."""

    files_url: str  # "<relative dir>/<name>_files/"
    width: int  # size of the top level written (the DZI "Size")
    height: int
    level0: tuple[int, int]  # the slide's level-0 size (the overlay is placed in these coordinates)

    def tile_source(self) -> dict[str, Any]:
        """The DZI descriptor as the JSON object OpenSeadragon accepts inline (no XML file to fetch: a page
        opened from disk may not fetch files with XMLHttpRequest)."""
        return {
            "Image": {
                "xmlns": "http://schemas.microsoft.com/deepzoom/2008",
                "Url": self.files_url,
                "Format": "jpeg",
                "Overlap": str(OVERLAP),
                "TileSize": str(TILE_SIZE),
                "Size": {"Width": str(self.width), "Height": str(self.height)},
            }
        }


def write_pyramid(slide: Any, out_dir: Path, name: str, url_prefix: str, max_dim: int = 4096) -> Pyramid:
    """Write the Deep Zoom tiles of an open OpenSlide ``slide`` into ``out_dir/<name>_files/``.

    Levels are those of the full-resolution pyramid up to the first whose larger side reaches ``max_dim``:
    they are exactly the pyramid of an image of that level's size, so the descriptor simply declares it.
    """
    from openslide.deepzoom import DeepZoomGenerator

    gen = DeepZoomGenerator(slide, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)
    top = next(
        (i for i, (w, h) in enumerate(gen.level_dimensions) if max(w, h) >= max_dim), gen.level_count - 1
    )
    files = out_dir / f"{name}_files"
    for level in range(top + 1):
        cols, rows = gen.level_tiles[level]
        folder = files / str(level)
        folder.mkdir(parents=True, exist_ok=True)
        for col in range(cols):
            for row in range(rows):
                # Plain writes: the whole report folder is staged and renamed into place at once.
                tile = gen.get_tile(level, (col, row))
                tile.convert("RGB").save(folder / f"{col}_{row}.jpeg", format="JPEG", quality=85)
    width, height = gen.level_dimensions[top]
    level0 = tuple(int(v) for v in slide.dimensions)
    return Pyramid(f"{url_prefix}/{name}_files/", int(width), int(height), (level0[0], level0[1]))


@dataclass(frozen=True)
class Overlay:
    """A written score overlay: its grid and how wide it is relative to the slide (the last column of patches
    may reach past the slide's right edge)."""

    path: Path
    cols: int
    rows: int
    width_fraction: float  # overlay width / slide level-0 width


def colormap_rgba(values: np.ndarray, alpha: int = 255) -> np.ndarray:
    """Scores in [0, 1] (NaN = no patch) -> RGBA uint8 with matplotlib's ``turbo`` (NaN fully transparent)."""
    import matplotlib

    cmap = matplotlib.colormaps["turbo"]
    v = np.asarray(values, dtype=float)
    rgba = (cmap(np.clip(np.nan_to_num(v, nan=0.0), 0.0, 1.0)) * 255).astype(np.uint8)
    rgba[..., 3] = np.where(np.isnan(v), 0, alpha).astype(np.uint8)
    return rgba


def write_overlay(
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: float,
    level0: tuple[int, int],
    out: Path,
    cell_px: int = 8,
) -> Overlay:
    """One ``cell_px``-square block per patch position, coloured by its score in [0, 1] (clipped)."""
    from PIL import Image

    size = float(patch_size_level0)
    width, height = level0
    cols, rows = max(1, math.ceil(width / size)), max(1, math.ceil(height / size))
    grid = np.full((rows, cols), np.nan)
    xy = np.asarray(coords, dtype=float).reshape(-1, 2)
    if len(xy):
        ci = np.clip((xy[:, 0] // size).astype(int), 0, cols - 1)
        ri = np.clip((xy[:, 1] // size).astype(int), 0, rows - 1)
        grid[ri, ci] = np.asarray(scores, dtype=float).reshape(-1)
    rgba = colormap_rgba(grid).repeat(cell_px, axis=0).repeat(cell_px, axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba).save(out, format="PNG", optimize=True)
    return Overlay(out, cols, rows, cols * size / max(width, 1))
