"""Synthetic slides: valid OpenSlide pyramids with the right µm/px, sparse lesions, a usable manifest."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest

from icmil.config import SynthConfig
from icmil.slides import corrupt_tile, open_slide, slide_mpp, synthesize_cohort, write_synthetic_slide
from icmil.slides.synth import LEVEL_DOWNSAMPLE, level_shapes


def test_cohort_manifest_labels_split_and_lesions(cohort: Path) -> None:
    df = pd.read_csv(cohort)
    assert list(df.columns) == ["slide_id", "path", "label", "split"]
    assert sorted(df["label"]) == ["normal", "normal", "tumor", "tumor"]
    assert set(df["split"]) <= {"train", "val", "test"} and "train" in set(df["split"])
    # Stratified: every split that got a slide of one class got the other class as well here (2 + 2 slides).
    assert all((cohort.parent / p).is_file() for p in df["path"])
    lesions = json.loads((cohort.parent / "lesions.json").read_text())
    for sid, label in zip(df["slide_id"], df["label"], strict=True):
        if label == "normal":
            assert lesions[sid] == []
        else:
            assert 1 <= len(lesions[sid]) <= 3
            for x0, y0, x1, y1 in lesions[sid]:
                assert 0 <= x0 < x1 <= 1024 and 0 <= y0 < y1 <= 768


def test_slide_opens_with_levels_mpp_and_tissue(tmp_path: Path) -> None:
    path = tmp_path / "s.tiff"
    write_synthetic_slide(path, SynthConfig(mpp=0.25), seed=1, positive=False, width=4096, height=3072)
    slide = open_slide(path, "s")
    assert slide.level_count == 3
    assert slide.level_dimensions == ((4096, 3072), (1024, 768), (256, 192))
    assert [round(d) for d in slide.level_downsamples] == [1, 4, 16]
    assert slide_mpp(slide, "s", None) == pytest.approx(0.25)
    assert float(slide.properties["tiff.XResolution"]) == pytest.approx(1e4 / 0.25)
    assert slide.properties["tiff.ResolutionUnit"] == "centimeter"
    # Tissue (saturated pink) on a light, unsaturated background, at every level.
    for level in (1, 2):
        rgb = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
        sat = rgb.max(-1).astype(int) - rgb.min(-1)
        tissue = sat > 40
        assert 0.1 < tissue.mean() < 0.8, level
        assert rgb[~tissue].mean() > 220  # background is white/light grey
        assert rgb[tissue][:, 1].mean() < rgb[tissue][:, 0].mean()  # H&E: green absorbed most


def test_levels_reach_a_thumbnail_resolution() -> None:
    shapes = level_shapes(20000, 20000)
    assert shapes[0] == (20000, 20000)
    # 0.5 µm/px at level 0: level 2 is 8 µm/px, the mask resolution.
    assert shapes[2] == (20000 // 16, 20000 // 16)
    assert all(b[0] == a[0] // LEVEL_DOWNSAMPLE for a, b in itertools.pairwise(shapes))


def test_lesion_nuclei_are_larger_and_darker_than_normal_ones(tmp_path: Path) -> None:
    import cv2

    path = tmp_path / "t.tiff"
    cfg = SynthConfig(lesion_contrast=1.0)
    boxes = write_synthetic_slide(path, cfg, seed=11, positive=True, width=2048, height=1536)
    assert boxes
    slide = openslide.OpenSlide(path)
    x0, y0, x1, y1 = boxes[0]
    # Lesions are big enough to hold whole 256-px patches at level 0.
    assert x1 - x0 >= 512 and y1 - y0 >= 512
    gray = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("L"), dtype=np.uint8)
    _, _, stats, centroids = cv2.connectedComponentsWithStats((gray < 150).astype(np.uint8), connectivity=8)
    areas, (cx, cy) = stats[1:, cv2.CC_STAT_AREA], centroids[1:].T
    nuclei = areas >= 5
    # Nuclei in the central half of the lesion box are lesion nuclei; those far from every box are normal.
    qx, qy = (x1 - x0) // 4, (y1 - y0) // 4
    in_lesion = (cx > x0 + qx) & (cx < x1 - qx) & (cy > y0 + qy) & (cy < y1 - qy)
    far = np.ones_like(in_lesion)
    for bx0, by0, bx1, by1 in boxes:
        far &= ~((cx > bx0 - 64) & (cx < bx1 + 64) & (cy > by0 - 64) & (cy < by1 + 64))
    lesion_areas, normal_areas = areas[nuclei & in_lesion], areas[nuclei & far]
    assert len(lesion_areas) > 20 and len(normal_areas) > 20
    assert np.median(lesion_areas) > 1.5 * np.median(normal_areas)  # radius x1.6 at full contrast


def test_lesion_contrast_zero_means_no_difference(tmp_path: Path) -> None:
    cfg = SynthConfig(lesion_contrast=0.0)
    a = write_synthetic_slide(tmp_path / "p.tiff", cfg, seed=5, positive=True, width=1024, height=768)
    assert a  # the lesion boxes are still reported
    pos = openslide.OpenSlide(tmp_path / "p.tiff")
    x0, y0, x1, y1 = a[0]
    inside = np.asarray(pos.read_region((x0, y0), 0, (x1 - x0, y1 - y0)).convert("L"), dtype=float)
    write_synthetic_slide(tmp_path / "n.tiff", cfg, seed=5, positive=False, width=1024, height=768)
    neg = openslide.OpenSlide(tmp_path / "n.tiff")
    same = np.asarray(neg.read_region((x0, y0), 0, (x1 - x0, y1 - y0)).convert("L"), dtype=float)
    # Same geometry draw aside, the texture statistics of lesion and normal tissue agree at contrast 0.
    t_in, t_same = inside[inside < 225], same[same < 225]
    assert abs(t_in.mean() - t_same.mean()) < 6


def test_same_seed_same_slide_and_rerun_keeps_files(tmp_path: Path) -> None:
    cfg = SynthConfig(n_slides=2, width=768, height=512, seed=5)
    m1 = synthesize_cohort(tmp_path / "a", cfg)
    m2 = synthesize_cohort(tmp_path / "b", cfg)
    for sid in ("slide_000", "slide_001"):
        a = (tmp_path / "a" / "slides" / f"{sid}.tiff").read_bytes()
        b = (tmp_path / "b" / "slides" / f"{sid}.tiff").read_bytes()
        assert a == b
    assert m1.read_text() == m2.read_text()
    slide = tmp_path / "a" / "slides" / "slide_000.tiff"
    before = slide.stat().st_mtime_ns
    synthesize_cohort(tmp_path / "a", cfg)
    assert slide.stat().st_mtime_ns == before  # finished slides are kept on a rerun
    synthesize_cohort(tmp_path / "a", cfg.model_copy(update={"val_fraction": 0.5}))
    assert slide.stat().st_mtime_ns == before  # a new split only rewrites the manifest
    synthesize_cohort(tmp_path / "a", cfg.model_copy(update={"lesion_contrast": 0.9}))
    assert slide.stat().st_mtime_ns != before  # changed settings rewrite them


def test_corrupt_tile_breaks_only_that_tile(tmp_path: Path) -> None:
    path = tmp_path / "c.tiff"
    write_synthetic_slide(path, SynthConfig(), seed=2, positive=False, width=1024, height=1024)
    x, y = corrupt_tile(path, level=0, tile_index=5)
    assert (x, y) == (256, 256)
    slide = openslide.OpenSlide(path)
    slide.read_region((0, 0), 0, (256, 256))  # an intact tile still reads
    with pytest.raises(openslide.OpenSlideError):
        slide.read_region((x, y), 0, (256, 256))
    fresh = openslide.OpenSlide(path)  # a new handle reads the intact tiles again
    fresh.read_region((512, 512), 0, (256, 256))


def test_slide_without_resolution_and_blank_slide(tmp_path: Path) -> None:
    write_synthetic_slide(
        tmp_path / "n.tiff", SynthConfig(), seed=1, positive=False, width=512, height=512, mpp=0
    )
    props = openslide.OpenSlide(tmp_path / "n.tiff").properties
    assert "openslide.mpp-x" not in props
    write_synthetic_slide(
        tmp_path / "b.tiff", SynthConfig(), seed=1, positive=True, width=512, height=512, blank=True
    )
    rgb = np.asarray(
        openslide.OpenSlide(tmp_path / "b.tiff").read_region((0, 0), 0, (512, 512)).convert("RGB")
    )
    assert rgb.reshape(-1, 3).std(0).max() < 1 and rgb.mean() > 220
