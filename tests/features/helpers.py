"""Tiny synthetic slides and tiles files for the feature tests (independent of the tiling code under test)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import tifffile


def write_pyramid(
    path: Path, width: int, height: int, *, mpp: float = 0.5, levels: int = 2, seed: int = 0
) -> Path:
    """A pyramidal RGB TIFF, one page per level, 256-px zlib tiles, µm/px in centimetre resolution tags."""
    rng = np.random.default_rng(seed)
    # Smooth colour noise + a sharp texture: patches differ from each other and from their neighbours.
    low = rng.integers(60, 230, size=(max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    img = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img.astype(np.int16) + rng.integers(-25, 25, size=img.shape), 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        level = img
        for i in range(levels):
            res = 1e4 / (mpp * 2**i)
            tif.write(
                level,
                tile=(256, 256),
                compression="zlib",
                photometric="rgb",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
            )
            level = cv2.resize(
                level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA
            )
    return path


def corrupt_tiff_tile(path: Path, page: int, tile_index: int) -> None:
    """Overwrite one compressed tile with garbage so OpenSlide fails to decode it (and breaks its handle)."""
    with tifffile.TiffFile(path) as tif:
        p = tif.pages[page]
        offset, count = p.dataoffsets[tile_index], p.databytecounts[tile_index]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xde\xad\xbe\xef" * (count // 4) + b"\x00" * (count % 4))


@dataclass
class FakeTiles:
    """Just the tiles fields a PatchReader needs."""

    coords: np.ndarray
    read_level: int
    read_size: int
    patch_size: int
    slide_id: str = "s"


def grid(width: int, height: int, step: int) -> np.ndarray:
    """Row-major grid of level-0 top-left coords (x, y) that fit inside the slide."""
    ys, xs = np.mgrid[0 : height - step + 1 : step, 0 : width - step + 1 : step]
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)


def write_tiles_h5(
    path: Path,
    coords: np.ndarray,
    *,
    read_level: int,
    read_size: int,
    patch_size: int,
    slide_path: str,
    slide_id: str,
    slide_mpp: float = 0.5,
    target_mpp: float = 0.5,
) -> Path:
    """A tiles file per docs/architecture.md (CLAM's patches/*.h5 layout + our attrs)."""
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("coords", data=coords.astype(np.int64))
        for k, v in {
            "patch_level": read_level,
            "patch_size": patch_size,
            "read_size": read_size,
            "slide_mpp": slide_mpp,
            "target_mpp": target_mpp,
            "slide_path": slide_path,
            "slide_id": slide_id,
            "slide_digest": "",
            "settings_digest": "test",
        }.items():
            ds.attrs[k] = v
    return path
