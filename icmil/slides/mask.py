"""Tissue detection on a low-resolution thumbnail, the CLAM way (HSV saturation, blur, threshold, morphology).

Stain is saturated and glass is not, so saturation separates tissue from background robustly across stains
and scanners; the median blur removes dust and noise, closing joins ragged tissue edges, and the area filters
(given in µm², so they mean the same at every thumbnail resolution) drop debris and fill small holes.

Example:
    >>> import numpy as np
    >>> from icmil.config import TilingConfig
    >>> rgb = np.full((100, 100, 3), 240, np.uint8)
    >>> rgb[20:80, 20:80] = (200, 120, 170)  # a pink square
    >>> mask = tissue_mask(rgb, TilingConfig(min_tissue_area_um2=0, min_hole_area_um2=0), mpp=8.0)
    >>> int(mask.sum()) in range(3400, 3700)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import openslide

from icmil.config import TilingConfig

# Read the level for the thumbnail in strips of at most this many pixels (~64 MB of RGBA).
_STRIP_PIXELS = 16_000_000


@dataclass(frozen=True)
class Thumbnail:
    """A low-resolution RGB view of the whole slide and how it maps to level 0."""

    rgb: np.ndarray  # uint8 (h, w, 3)
    downsample: tuple[float, float]  # level-0 px per thumbnail px along x and y
    mpp: float  # µm per thumbnail px (mean of x and y)
    level: int  # the pyramid level it was read from


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    # Regions outside the scanned area come back transparent: treat them as glass (white), not black tissue.
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb


def thumbnail_level(
    level_downsamples: tuple[float, ...] | list[float],
    slide_mpp: float,
    mask_mpp: float,
    level_pixels: Sequence[int] | None = None,
    max_pixels: int | None = None,
) -> int:
    """The coarsest level that is still at least as fine as ``mask_mpp`` (1 % tolerance); level 0 if none.

    With ``level_pixels`` and ``max_pixels``, a level above that pixel budget gives way to the finest level
    within it (a coarser mask, read in bounded time); if no level fits, the preferred one is returned and the
    caller decides (:func:`read_thumbnail` refuses it).

    >>> thumbnail_level((1.0, 4.0, 16.0, 64.0), 0.5, 8.0)
    2
    >>> thumbnail_level((1.0, 4.0, 16.0), 0.5, 2.0, level_pixels=(16e8, 1e8, 6.25e6), max_pixels=5e7)
    2
    """
    best = 0
    for level, d in enumerate(level_downsamples):
        if slide_mpp * d <= mask_mpp * 1.01:
            best = level if d >= level_downsamples[best] else best
    if level_pixels is not None and max_pixels is not None and level_pixels[best] > max_pixels:
        fitting = [lv for lv, n in enumerate(level_pixels) if n <= max_pixels]
        if fitting:
            best = max(fitting, key=lambda lv: level_pixels[lv])
    return best


def read_thumbnail(
    slide: openslide.OpenSlide, slide_mpp: float, mask_mpp: float, max_pixels: int | None = None
) -> Thumbnail:
    """Read the whole slide at about ``mask_mpp`` µm/px from the best pyramid level, never from level 0 of
    a large slide unless it has no coarser level; a level much larger than the thumbnail is read in strips.
    ``max_pixels`` bounds the level read (see :func:`thumbnail_level`); ``ValueError`` when no level fits.

    >>> import tempfile, pathlib
    >>> from icmil.config import SynthConfig
    >>> from icmil.slides.synth import write_synthetic_slide
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.tiff"
    >>> _ = write_synthetic_slide(p, SynthConfig(), seed=1, positive=False, width=4096, height=2048)
    >>> t = read_thumbnail(openslide.OpenSlide(p), 0.5, 8.0)
    >>> t.rgb.shape, t.level, t.mpp
    ((128, 256, 3), 2, 8.0)
    """
    w0, h0 = slide.dimensions
    pixels = [lw * lh for lw, lh in slide.level_dimensions]
    level = thumbnail_level(slide.level_downsamples, slide_mpp, mask_mpp, pixels, max_pixels)
    lw, lh = slide.level_dimensions[level]
    if max_pixels is not None and lw * lh > max_pixels:
        raise ValueError(
            f"the smallest level is {lw}x{lh} px ({lw * lh / 1e6:.0f} Mpx), above the {max_pixels / 1e6:.0f} Mpx "
            "budget for the tissue mask"
        )
    d = slide.level_downsamples[level]
    scale = min(1.0, slide_mpp * d / mask_mpp)  # thumbnail px per level px (never upsample)
    tw, th = max(1, round(lw * scale)), max(1, round(lh * scale))
    if lw * lh <= _STRIP_PIXELS:
        rgb = _rgba_to_rgb(np.asarray(slide.read_region((0, 0), level, (lw, lh))))
        if (tw, th) != (lw, lh):
            rgb = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA)
    else:
        rgb = np.empty((th, tw, 3), dtype=np.uint8)
        rows = max(1, _STRIP_PIXELS // lw)
        for y in range(0, lh, rows):
            sh = min(rows, lh - y)
            t0, t1 = round(y * th / lh), round((y + sh) * th / lh)
            if t1 <= t0:
                continue
            strip = _rgba_to_rgb(np.asarray(slide.read_region((0, round(y * d)), level, (lw, sh))))
            rgb[t0:t1] = cv2.resize(strip, (tw, t1 - t0), interpolation=cv2.INTER_AREA)
    ds = (w0 / tw, h0 / th)
    return Thumbnail(rgb=rgb, downsample=ds, mpp=slide_mpp * (ds[0] + ds[1]) / 2, level=level)


def _remove_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    if min_pixels <= 1:
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    if max_pixels <= 1:
        return mask
    inverse = (~mask).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(inverse, connectivity=4)
    h, w = mask.shape
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    # Background that touches the image border is glass around the tissue, not a hole in it.
    touches = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = np.zeros(n, dtype=bool)
    fill[1:] = (stats[1:, cv2.CC_STAT_AREA] < max_pixels) & ~touches[1:]
    return mask | fill[labels]


def tissue_mask(rgb: np.ndarray, cfg: TilingConfig, mpp: float) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail taken at ``mpp`` µm/px.

    Saturation channel -> median blur (``cfg.median_blur``) -> threshold (``cfg.saturation_threshold``, or
    Otsu's threshold when ``cfg.use_otsu``, never below the fixed one so a blank slide stays blank) ->
    closing (``cfg.close_kernel``) -> drop tissue pieces under ``cfg.min_tissue_area_um2`` and fill holes
    under ``cfg.min_hole_area_um2``.
    """
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an RGB image (h, w, 3), got shape {rgb.shape}")
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    if cfg.median_blur > 1 and min(sat.shape) >= cfg.median_blur:
        sat = cv2.medianBlur(sat, cfg.median_blur)
    threshold = float(cfg.saturation_threshold)
    if cfg.use_otsu:
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(threshold, float(otsu))
    mask = sat > threshold
    if cfg.close_kernel > 0:
        kernel = np.ones((cfg.close_kernel, cfg.close_kernel), np.uint8)
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    px_area = mpp * mpp  # µm² per thumbnail pixel
    mask = _remove_small(mask, cfg.min_tissue_area_um2 / px_area)
    return _fill_small_holes(mask, cfg.min_hole_area_um2 / px_area)
