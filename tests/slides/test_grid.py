"""Read-level choice for a target µm/px and the tissue-filtered patch grid."""

from __future__ import annotations

import numpy as np
import pytest

from icmil.slides import LevelChoice, choose_read_level, patch_grid


@pytest.mark.parametrize(
    ("downsamples", "slide_mpp", "target", "patch", "expected"),
    [
        ((1.0, 4.0, 16.0), 0.5, 0.5, 256, LevelChoice(0, 256, 1.0)),  # 20x scan, 20x patches
        ((1.0, 4.0, 16.0), 0.25, 0.5, 256, LevelChoice(0, 512, 1.0)),  # 40x scan: read 512, shrink
        ((1.0, 4.0, 16.0), 0.25, 1.0, 256, LevelChoice(1, 256, 4.0)),  # level 1 is exactly 1 µm/px
        ((1.0, 4.0, 16.0), 0.25, 2.0, 256, LevelChoice(1, 512, 4.0)),  # never upsample from level 2 (4 µm)
        ((1.0, 2.0, 4.0), 0.2527, 0.5, 256, LevelChoice(0, 507, 1.0)),  # level 1 (0.5054) is >1% too coarse
        ((1.0, 2.0, 4.0), 0.2502, 0.5, 256, LevelChoice(1, 256, 2.0)),  # 0.5004 within 1%: read 1:1
        ((1.0, 4.0), 0.5, 0.25, 256, LevelChoice(0, 128, 1.0)),  # target finer than the scan: upsample
        ((1.0, 4.000977, 16.01563), 0.5, 2.0, 224, LevelChoice(1, 224, 4.000977)),  # odd-size pyramids
    ],
)
def test_choose_read_level(
    downsamples: tuple[float, ...], slide_mpp: float, target: float, patch: int, expected: LevelChoice
) -> None:
    got = choose_read_level(downsamples, slide_mpp, target, patch)
    assert got == expected
    # The patch covers target * patch µm whatever the level (up to the 1 % tolerance and rounding).
    physical = got.read_size * got.downsample_level0 * slide_mpp
    assert physical == pytest.approx(target * patch, rel=0.012)


def test_choose_read_level_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        choose_read_level((1.0,), 0.0, 0.5, 256)


def test_size_level0() -> None:
    assert LevelChoice(1, 256, 4.0).size_level0 == 1024
    assert LevelChoice(0, 507, 1.0).size_level0 == 507


def test_grid_keeps_patches_by_tissue_fraction() -> None:
    mask = np.zeros((8, 8), bool)  # 1 mask px = 32 level-0 px; slide 256 x 256; patches 64 px = 2 x 2 mask px
    mask[0:2, 0:2] = True  # patch (0, 0): 100 %
    mask[0:1, 2:4] = True  # patch (64, 0): 50 %
    mask[2:4, 0:2] = True
    mask[3, 1] = False  # patch (0, 64): 75 %
    coords = patch_grid(mask, 32.0, (256, 256), 64, 0.75)
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    assert coords.tolist() == [[0, 0], [0, 64]]
    assert patch_grid(mask, 32.0, (256, 256), 64, 0.5).tolist() == [[0, 0], [64, 0], [0, 64]]
    assert len(patch_grid(mask, 32.0, (256, 256), 64, 0.0)) == 16  # every whole patch


def test_grid_only_whole_patches_inside_the_slide() -> None:
    mask = np.ones((10, 13), bool)
    coords = patch_grid(mask, 16.0, (200, 150), 64, 0.8)
    assert coords.tolist() == [[0, 0], [64, 0], [128, 0], [0, 64], [64, 64], [128, 64]]
    assert (coords[:, 0] + 64 <= 200).all() and (coords[:, 1] + 64 <= 150).all()
    assert patch_grid(mask, 16.0, (50, 50), 64, 0.0).shape == (0, 2)


def test_grid_with_anisotropic_downsample_and_patches_smaller_than_a_mask_pixel() -> None:
    mask = np.zeros((4, 4), bool)
    mask[:, 2:] = True  # right half is tissue
    coords = patch_grid(mask, (100.0, 50.0), (400, 200), 50, 1.0)
    assert set(coords[:, 0].tolist()) == {200, 250, 300, 350}
    assert set(coords[:, 1].tolist()) == {0, 50, 100, 150}


def test_grid_agrees_with_a_brute_force_count() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((60, 80)) > 0.4
    ds, ps, frac = 8.0, 32, 0.6
    coords = patch_grid(mask, ds, (640, 480), ps, frac)
    expected = []
    for y in range(0, 480 - ps + 1, ps):
        for x in range(0, 640 - ps + 1, ps):
            window = mask[y // 8 : (y + ps) // 8, x // 8 : (x + ps) // 8]
            if window.mean() >= frac:
                expected.append([x, y])
    assert coords.tolist() == expected
