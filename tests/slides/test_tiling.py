"""Tiling stage: the tiles HDF5 contract, resume/skip, status table, shards, failure fraction."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import openslide
import pandas as pd
import pytest

from icmil.config import SynthConfig
from icmil.errors import FeatureStoreError, ManifestError, StageFailed
from icmil.manifest import read_manifest
from icmil.slides import read_tiles, slide_digest, tile_manifest, tile_slide, write_synthetic_slide
from icmil.slides.tiling import tiling_settings_digest

from .conftest import small_tiling


def test_tiles_hdf5_layout(cohort: Path, tmp_path: Path) -> None:
    m = read_manifest(cohort)
    report = tile_manifest(m, tmp_path, small_tiling())
    assert report.n_ok == 4 and report.n_failed == 0
    sid = m.slides["slide_id"][0]
    path = m.slides["path"][0]
    with h5py.File(tmp_path / f"{sid}.h5", "r") as f:
        assert list(f.keys()) == ["coords"]
        ds = f["coords"]
        assert ds.dtype == np.int64 and ds.ndim == 2 and ds.shape[1] == 2 and ds.shape[0] > 10
        a = dict(ds.attrs)
    assert a["patch_level"] == 0 and a["patch_size"] == 64 and a["read_size"] == 128
    assert a["slide_mpp"] == pytest.approx(0.5) and a["target_mpp"] == 1.0
    assert a["slide_path"] == path and a["slide_id"] == sid
    assert a["slide_digest"] == slide_digest(path)
    assert a["settings_digest"] == tiling_settings_digest(small_tiling())
    assert list(a["downsample"]) == [1.0, 1.0] and list(a["level_dim"]) == [1024, 768]

    tiles = read_tiles(tmp_path / f"{sid}.h5")
    assert tiles.read_level == 0 and tiles.read_size == 128 and tiles.patch_size == 64
    assert tiles.size_level0 == 128 and tiles.slide_id == sid
    coords = tiles.coords
    assert (coords % 128 == 0).all()  # non-overlapping grid in level-0 px
    assert len(np.unique(coords, axis=0)) == len(coords)
    assert (coords[:, 0] + 128 <= 1024).all() and (coords[:, 1] + 128 <= 768).all()
    # Kept patches are on tissue: their pixels are saturated (pink/purple), not glass.
    slide = openslide.OpenSlide(path)
    for x, y in coords[:: max(1, len(coords) // 5)]:
        rgb = np.asarray(slide.read_region((int(x), int(y)), 0, (128, 128)).convert("RGB")).astype(int)
        assert ((rgb.max(-1) - rgb.min(-1)) > 25).mean() > 0.7
    # The overlay thumbnail sits next to the tiles.
    assert (tmp_path / f"{sid}.png").stat().st_size > 0

    status = pd.read_csv(tmp_path / "status.csv", keep_default_na=False)
    assert list(status.columns) == ["slide_id", "status", "n_patches", "error", "seconds", "skipped"]
    assert set(status["status"]) == {"ok"} and (status["n_patches"] > 0).all()


def test_rerun_skips_and_changed_settings_or_slide_redo(cohort: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    shutil.copytree(cohort.parent / "slides", slides)
    m = read_manifest(cohort)
    m.slides["path"] = [str(slides / Path(p).name) for p in m.slides["path"]]
    out = tmp_path / "tiles"
    first = tile_manifest(m, out, small_tiling())
    assert first.n_skipped == 0
    h5 = out / "slide_000.h5"
    stamp = h5.stat().st_mtime_ns

    second = tile_manifest(m, out, small_tiling())
    assert second.n_skipped == 4 and h5.stat().st_mtime_ns == stamp
    assert second.status["n_patches"].tolist() == first.status["n_patches"].tolist()

    changed = tile_manifest(m, out, small_tiling(min_tissue_fraction=0.3))
    assert changed.n_skipped == 0 and h5.stat().st_mtime_ns != stamp
    assert (changed.status["n_patches"] >= first.status["n_patches"]).all()

    # A replaced slide file (new bytes, same path) is tiled again.
    write_synthetic_slide(
        slides / "slide_000.tiff", SynthConfig(), seed=99, positive=False, width=1024, height=768
    )
    again = tile_manifest(m, out, small_tiling(min_tissue_fraction=0.3))
    assert again.status.set_index("slide_id")["skipped"].to_dict() == {
        "slide_000": False,
        "slide_001": True,
        "slide_002": True,
        "slide_003": True,
    }
    assert read_tiles(h5).slide_digest == slide_digest(slides / "slide_000.tiff")


def test_manifest_mpp_column_overrides_and_is_part_of_the_settings(cohort: Path, tmp_path: Path) -> None:
    df = pd.read_csv(cohort)
    df["path"] = [str(cohort.parent / p) for p in df["path"]]
    df["mpp"] = ["0.25", "", "", ""]  # pretend slide_000 was scanned at 40x
    csv = tmp_path / "m.csv"
    df.to_csv(csv, index=False)
    report = tile_manifest(read_manifest(csv), tmp_path / "t", small_tiling())
    t0, t1 = read_tiles(tmp_path / "t" / "slide_000.h5"), read_tiles(tmp_path / "t" / "slide_001.h5")
    # 64 px at 1 µm/px = 256 level-0 px at 0.25 µm/px, which level 1 (1 µm/px) holds as 64 px.
    assert t0.slide_mpp == 0.25 and (t0.read_level, t0.read_size, t0.size_level0) == (1, 64, 256)
    assert t1.slide_mpp == 0.5 and t1.read_size == 128
    assert t0.settings_digest != t1.settings_digest
    assert report.n_ok == 4


def test_shard_writes_its_own_status_and_only_its_slides(cohort: Path, tmp_path: Path) -> None:
    m = read_manifest(cohort)
    report = tile_manifest(m, tmp_path, small_tiling(), slide_ids=["slide_001", "slide_003", "nope"], shard=1)
    assert report.status_path.name == "status-1.csv"
    assert sorted(p.stem for p in tmp_path.glob("*.h5")) == ["slide_001", "slide_003"]
    rows = report.status.set_index("slide_id")
    assert rows.loc["nope", "status"] == "error" and "not in the manifest" in rows.loc["nope", "error"]
    unnamed = tile_manifest(m, tmp_path, small_tiling(), slide_ids=["slide_000"])
    assert unnamed.status_path.name.startswith("status-") and unnamed.status_path.name != "status-1.csv"


def test_stage_fails_past_the_failure_fraction_after_writing_the_status(cohort: Path, tmp_path: Path) -> None:
    df = pd.read_csv(cohort)
    df["path"] = [str(cohort.parent / p) for p in df["path"]]
    df.loc[0, "path"] = str(tmp_path / "gone.tiff")
    csv = tmp_path / "m.csv"
    df.to_csv(csv, index=False)
    m = read_manifest(csv)
    ok = tile_manifest(m, tmp_path / "a", small_tiling(max_failed_fraction=0.25))  # 1 of 4 is allowed
    assert ok.n_failed == 1 and ok.failures.keys() == {"slide_000"}
    with pytest.raises(StageFailed) as info:
        tile_manifest(m, tmp_path / "b", small_tiling(max_failed_fraction=0.2))
    assert "slide_000" in str(info.value) and "file not found" in str(info.value)
    assert "1 of 4" in str(info.value)
    status = pd.read_csv(tmp_path / "b" / "status.csv", keep_default_na=False)
    assert len(status) == 4 and (status["status"] == "ok").sum() == 3  # written before failing


def test_manifest_row_errors_surface_in_the_status_table(cohort: Path, tmp_path: Path) -> None:
    df = pd.read_csv(cohort)
    df["path"] = [str(cohort.parent / p) for p in df["path"]]
    extra = pd.DataFrame(
        [
            {"slide_id": "dup", "path": df["path"][0], "label": "normal", "split": "train"},
            {"slide_id": "dup", "path": df["path"][1], "label": "normal", "split": "train"},
            {"slide_id": "odd", "path": df["path"][2], "label": "benign??", "split": "train"},
        ]
    )
    csv = tmp_path / "m.csv"
    pd.concat([df, extra]).to_csv(csv, index=False)
    m = read_manifest(csv, classes=["normal", "tumor"])
    report = tile_manifest(m, tmp_path / "t", small_tiling())
    rows = report.status.set_index("slide_id")
    assert rows.loc["dup", "status"] == "error" and "duplicate slide_id" in rows.loc["dup", "error"]
    assert rows.loc["odd", "status"] == "error" and "unknown label" in rows.loc["odd", "error"]
    assert report.n_ok == 4 and len(report.status) == 6
    # More than the allowed fraction of bad rows fails the stage, naming them.
    with pytest.raises(StageFailed, match="duplicate slide_id"):
        tile_manifest(m, tmp_path / "t", small_tiling(max_failed_fraction=0.1))


def test_missing_manifest_column_is_a_manifest_error(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("slide_id,file,label\ns1,a.tiff,normal\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['path'\]"):
        read_manifest(csv)


def test_read_tiles_rejects_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FeatureStoreError, match="not found"):
        read_tiles(tmp_path / "none.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["features"] = np.zeros((2, 3))
    with pytest.raises(FeatureStoreError, match="not a valid tiles HDF5"):
        read_tiles(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(FeatureStoreError, match="not a valid tiles HDF5"):
        read_tiles(tmp_path / "junk.h5")


def test_multi_level_slide_reads_from_a_coarser_level(tmp_path: Path) -> None:
    path = tmp_path / "big.tiff"
    write_synthetic_slide(path, SynthConfig(mpp=0.25), seed=4, positive=True, width=4096, height=3072)
    info = tile_slide("big", path, tmp_path / "big.h5", small_tiling(patch_size=64, target_mpp=1.0))
    tiles = read_tiles(tmp_path / "big.h5")
    assert info.n_patches == len(tiles.coords) > 30
    assert tiles.read_level == 1 and tiles.read_size == 64 and tiles.level_downsample == 4.0
    assert tiles.size_level0 == 256 and (tiles.coords % 256 == 0).all()
    assert info.choice is not None and info.choice.level == 1


def test_thumbnail_of_a_large_level_is_read_in_strips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from icmil.slides import mask as mask_module

    path = tmp_path / "flat.tiff"
    write_synthetic_slide(path, SynthConfig(), seed=2, positive=False, width=1024, height=768)
    slide = openslide.OpenSlide(path)
    whole = mask_module.read_thumbnail(slide, 0.5, 2.0)
    monkeypatch.setattr(mask_module, "_STRIP_PIXELS", 30_000)  # ~30 rows of the 1024-px level at a time
    strips = mask_module.read_thumbnail(slide, 0.5, 2.0)
    assert strips.rgb.shape == whole.rgb.shape == (192, 256, 3)
    assert strips.downsample == whole.downsample == (4.0, 4.0) and strips.mpp == 2.0
    assert np.abs(strips.rgb.astype(int) - whole.rgb.astype(int)).mean() < 2.0


def test_unsafe_ids_from_a_hand_built_manifest_never_leave_the_output_folder(
    cohort: Path, tmp_path: Path
) -> None:
    """Library callers may build a Manifest themselves; the stages still refuse ids that are not file names."""
    import pandas as pd

    from icmil.config import EmbedConfig, EncoderConfig
    from icmil.features import create_encoder, embed_manifest
    from icmil.manifest import Manifest

    good = read_manifest(cohort).slides.iloc[:1]
    evil = good.assign(slide_id="../escaped")
    manifest = Manifest(slides=pd.concat([good, evil], ignore_index=True), classes=["normal", "tumor"])
    out = tmp_path / "deep" / "tiles"
    report = tile_manifest(manifest, out, small_tiling())
    assert report.n_ok == 1 and "the slide id contains '/', a path separator" in report.failures["../escaped"]
    embedded = embed_manifest(
        manifest,
        out,
        tmp_path / "deep" / "features",
        create_encoder(EncoderConfig(name="tiny_cnn"), quiet_random=True),
        EmbedConfig(num_workers=0, max_failed_fraction=1.0),
    )
    assert embedded.n_ok == 1 and "path separator" in embedded.failures["../escaped"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["features", "tiles"]
    assert not list(tmp_path.glob("*.h5")) and not list((tmp_path / "deep").glob("*.h5"))
