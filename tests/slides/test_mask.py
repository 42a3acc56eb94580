"""Tissue mask on hand-made thumbnails: threshold, blur, closing, area filters in µm², Otsu."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from icmil.config import TilingConfig
from icmil.slides import tissue_mask
from icmil.slides.mask import thumbnail_level

PINK = (205, 120, 175)
GLASS = (242, 241, 244)


def canvas(h: int = 200, w: int = 200) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GLASS
    # Sensor noise on the glass must not become tissue.
    noise = rng.integers(-3, 4, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def no_area_filters(**kw: object) -> TilingConfig:
    return TilingConfig.model_validate({"min_tissue_area_um2": 0, "min_hole_area_um2": 0, **kw})


def test_pink_region_is_tissue_and_glass_is_not() -> None:
    img = canvas()
    cv2.circle(img, (100, 100), 50, PINK, -1)
    mask = tissue_mask(img, no_area_filters(), mpp=8.0)
    assert mask.dtype == bool and mask.shape == (200, 200)
    disc = np.zeros((200, 200), np.uint8)
    cv2.circle(disc, (100, 100), 50, 1, -1)
    agreement = (mask == disc.astype(bool)).mean()
    assert agreement > 0.99


def test_blank_slide_gives_empty_mask_even_with_otsu() -> None:
    img = canvas()
    assert not tissue_mask(img, no_area_filters(), mpp=8.0).any()
    # Otsu alone would split the glass noise in two; the fixed threshold is its floor.
    assert not tissue_mask(img, no_area_filters(use_otsu=True), mpp=8.0).any()


def test_otsu_adapts_to_faint_and_strong_stain() -> None:
    img = canvas()
    img[40:160, 40:160] = (225, 205, 220)  # faintly stained tissue: saturation ~ 20
    img[80:120, 80:120] = PINK
    fixed = tissue_mask(img, no_area_filters(saturation_threshold=8), mpp=8.0)
    otsu = tissue_mask(img, no_area_filters(use_otsu=True), mpp=8.0)
    assert fixed[50, 50] and fixed[100, 100]
    assert otsu[100, 100] and otsu.sum() < fixed.sum()


def test_median_blur_removes_speckle() -> None:
    img = canvas()
    rng = np.random.default_rng(1)
    ys, xs = rng.integers(0, 200, 150), rng.integers(0, 200, 150)
    img[ys, xs] = PINK  # isolated saturated pixels (dust)
    assert tissue_mask(img, no_area_filters(median_blur=1, close_kernel=0), mpp=8.0).sum() >= 100
    assert tissue_mask(img, no_area_filters(median_blur=5, close_kernel=0), mpp=8.0).sum() == 0


def test_small_pieces_dropped_and_small_holes_filled_by_area_in_um2() -> None:
    img = canvas()
    cv2.rectangle(img, (20, 20), (139, 139), PINK, -1)  # 120 x 120 px piece
    cv2.rectangle(img, (160, 160), (169, 169), PINK, -1)  # 10 x 10 px debris
    cv2.rectangle(img, (40, 40), (49, 49), GLASS, -1)  # 10 x 10 px hole
    cv2.rectangle(img, (70, 70), (109, 109), GLASS, -1)  # 40 x 40 px hole
    # At 8 µm/px: debris is 6 400 µm², small hole 6 400 µm², big hole 102 400 µm².
    cfg = TilingConfig(min_tissue_area_um2=20_000, min_hole_area_um2=20_000, close_kernel=0, median_blur=1)
    mask = tissue_mask(img, cfg, mpp=8.0)
    assert not mask[160:170, 160:170].any()  # debris dropped
    assert mask[40:50, 40:50].all()  # small hole filled
    assert not mask[75:105, 75:105].any()  # large hole (a real gap in the tissue) kept
    # Areas are physical: the 6 400 µm² debris is 100 px at 8 µm/px and 25 px at 16 µm/px; a threshold just
    # above drops it and one just below keeps it at both resolutions.
    small = cv2.resize(img, (100, 100), interpolation=cv2.INTER_NEAREST)
    for image, mpp, (y, x) in ((img, 8.0, (165, 165)), (small, 16.0, (82, 82))):
        drop = cfg.model_copy(update={"min_tissue_area_um2": 7_000})
        keep = cfg.model_copy(update={"min_tissue_area_um2": 5_000})
        assert not tissue_mask(image, drop, mpp=mpp)[y, x]
        assert tissue_mask(image, keep, mpp=mpp)[y, x]


def test_closing_joins_ragged_edges() -> None:
    img = canvas()
    cv2.rectangle(img, (20, 20), (180, 180), PINK, -1)
    img[:, 100:102] = GLASS  # a 2-px crack through the tissue
    cracked = tissue_mask(img, no_area_filters(close_kernel=0, median_blur=1), mpp=8.0)
    closed = tissue_mask(img, no_area_filters(close_kernel=4, median_blur=1), mpp=8.0)
    assert not cracked[50:150, 100].any()
    assert closed[50:150, 100].all()


def test_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        tissue_mask(np.zeros((10, 10), np.uint8), TilingConfig(), mpp=8.0)


@pytest.mark.parametrize(
    ("downsamples", "mpp", "expected"),
    [
        ((1.0, 4.0, 16.0, 64.0), 0.5, 2),  # 8 µm/px level exists
        ((1.0, 4.0, 16.0, 64.0), 0.25, 2),  # 4 µm/px: coarsest still at least as fine as 8
        ((1.0, 4.0, 16.0), 0.5039, 2),  # 8.06 µm/px counts as 8 (scanner rounding)
        ((1.0,), 0.5, 0),  # no pyramid
        ((1.0, 4.0), 10.0, 0),  # even level 0 is coarser than the mask resolution
    ],
)
def test_thumbnail_level(downsamples: tuple[float, ...], mpp: float, expected: int) -> None:
    assert thumbnail_level(downsamples, mpp, 8.0) == expected
