"""Where to read patches: the pyramid level for a target µm/px and the non-overlapping grid over tissue.

Example:
    >>> c = choose_read_level((1.0, 4.0, 16.0), slide_mpp=0.25, target_mpp=0.5, patch_size=256)
    >>> c.level, c.read_size, c.size_level0
    (0, 512, 512)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

# Scanners round their µm/px (0.2527 vs 0.25, 0.499 vs 0.5): within this tolerance a level counts as the
# target resolution and is read 1:1 instead of being resized by a hair.
MPP_TOLERANCE = 0.01


@dataclass(frozen=True)
class LevelChoice:
    """Read ``read_size`` px squares at ``level`` and resize them to the patch size.

    ``downsample_level0`` is the level's downsample factor; ``size_level0`` the patch edge in level-0 px.
    """

    level: int
    read_size: int
    downsample_level0: float

    @property
    def size_level0(self) -> int:
        return max(1, round(self.read_size * self.downsample_level0))


def choose_read_level(
    level_downsamples: Sequence[float], slide_mpp: float, target_mpp: float, patch_size: int
) -> LevelChoice:
    """The coarsest level whose µm/px is still at or below ``target_mpp`` (so patches are downsampled, never
    upsampled, unless even level 0 is coarser than the target), and the read size on that level.

    >>> choose_read_level((1.0, 4.0, 16.0), 0.5, 2.0, 256)      # level 1 is exactly 2 µm/px
    LevelChoice(level=1, read_size=256, downsample_level0=4.0)
    >>> choose_read_level((1.0, 4.0, 16.0), 0.2527, 0.5, 256)   # 40x scan read at level 0
    LevelChoice(level=0, read_size=507, downsample_level0=1.0)
    >>> choose_read_level((1.0, 2.0), 0.499, 1.0, 224)          # 0.998 counts as 1.0
    LevelChoice(level=1, read_size=224, downsample_level0=2.0)
    """
    if slide_mpp <= 0 or target_mpp <= 0 or patch_size <= 0:
        raise ValueError("slide_mpp, target_mpp and patch_size must be positive")
    best = 0
    for level, d in enumerate(level_downsamples):
        mpp = slide_mpp * d
        if mpp <= target_mpp * (1 + MPP_TOLERANCE) and mpp > slide_mpp * level_downsamples[best]:
            best = level
    level_mpp = slide_mpp * level_downsamples[best]
    ratio = target_mpp / level_mpp
    read_size = patch_size if abs(ratio - 1) <= MPP_TOLERANCE else max(1, round(patch_size * ratio))
    return LevelChoice(level=best, read_size=read_size, downsample_level0=float(level_downsamples[best]))


def patch_grid(
    mask: np.ndarray,
    mask_downsample: float | tuple[float, float],
    level0_size: tuple[int, int],
    patch_size_level0: int,
    min_tissue_fraction: float,
) -> np.ndarray:
    """Top-left level-0 (x, y) of every whole, non-overlapping patch whose tissue fraction reaches the minimum.

    ``mask`` is the thumbnail tissue mask, ``mask_downsample`` the level-0 px per mask px (one number or
    (x, y)), ``level0_size`` the slide's (width, height). Tissue fractions come from an integral image, so the
    cost is one lookup per candidate patch. Rows are ordered top to bottom, left to right.

    >>> m = np.zeros((10, 10), bool); m[:5, :5] = True
    >>> patch_grid(m, 16.0, (160, 160), 32, 0.8).tolist()
    [[0, 0], [32, 0], [0, 32], [32, 32]]
    """
    if isinstance(mask_downsample, tuple):
        dsx, dsy = float(mask_downsample[0]), float(mask_downsample[1])
    else:
        dsx = dsy = float(mask_downsample)
    w0, h0 = level0_size
    ps = int(patch_size_level0)
    if ps <= 0:
        raise ValueError("patch_size_level0 must be positive")
    xs = np.arange(0, w0 - ps + 1, ps, dtype=np.int64)
    ys = np.arange(0, h0 - ps + 1, ps, dtype=np.int64)
    if len(xs) == 0 or len(ys) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    mh, mw = mask.shape
    integral = cv2.integral(mask.astype(np.uint8)).astype(np.float64)  # (mh + 1, mw + 1)
    # Patch edges in mask px (fractional). The integral of a piecewise-constant image is bilinear inside each
    # pixel, so interpolating it at fractional corners gives the exact area-weighted tissue count.
    x0 = np.clip(xs / dsx, 0, mw)
    x1 = np.clip((xs + ps) / dsx, 0, mw)
    y0 = np.clip(ys / dsy, 0, mh)
    y1 = np.clip((ys + ps) / dsy, 0, mh)
    inside = (
        _integral_at(integral, y1, x1)
        - _integral_at(integral, y0, x1)
        - _integral_at(integral, y1, x0)
        + _integral_at(integral, y0, x0)
    )
    area = np.maximum(np.outer(y1 - y0, x1 - x0), 1e-12)
    fraction = inside / area
    keep = fraction >= min_tissue_fraction - 1e-6
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx[keep], gy[keep]], axis=1).astype(np.int64)


def _integral_at(integral: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of an integral image at every (y, x) in ``ys`` x ``xs`` -> (len(ys), len(xs))."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    iy = np.minimum(np.floor(ys).astype(np.int64), max(h - 1, 0))
    ix = np.minimum(np.floor(xs).astype(np.int64), max(w - 1, 0))
    ty, tx = (ys - iy)[:, None], (xs - ix)[None, :]
    a = integral[np.ix_(iy, ix)]
    b = integral[np.ix_(iy, ix + 1)]
    c = integral[np.ix_(iy + 1, ix)]
    d = integral[np.ix_(iy + 1, ix + 1)]
    return (1 - ty) * ((1 - tx) * a + tx * b) + ty * ((1 - tx) * c + tx * d)
