"""embed_manifest end to end on tiny synthetic slides: layout, resume, workers, corrupt tiles, bad slides."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from icmil.config import EmbedConfig, EncoderConfig, SynthConfig, TilingConfig
from icmil.errors import StageFailed
from icmil.features import create_encoder, embed_manifest, read_features
from icmil.manifest import read_manifest
from icmil.slides import corrupt_tile, read_tiles, synthesize_cohort, tile_manifest, tile_slide
from icmil.slides.patches import PatchReader


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    manifest_path = synthesize_cohort(
        root / "synth", SynthConfig(n_slides=3, width=1536, height=1024, seed=0)
    )
    manifest = read_manifest(manifest_path)
    # 1 µm/px from a 0.5 µm/px slide: every patch is read at 256 px and resized to 128 (the resize path).
    tile_manifest(manifest, root / "tiles", TilingConfig(patch_size=128, target_mpp=1.0))
    return root, manifest


def _encoder(seed: int = 0):
    return create_encoder(EncoderConfig(name="tiny_cnn", seed=seed), quiet_random=True)


def _cfg(**kw) -> EmbedConfig:
    return EmbedConfig(**({"batch_size": 16, "num_workers": 0} | kw))


def _copy_cohort(cohort, tmp_path):
    """The cohort's slides and tiles copied under tmp_path (to damage them) with a manifest pointing at the
    copies."""
    root, manifest = cohort
    rows = manifest.slides.copy()
    for i, row in rows.iterrows():
        dst = tmp_path / f"{row['slide_id']}.tiff"
        shutil.copy(row["path"], dst)
        rows.loc[i, "path"] = str(dst)
    rows[["slide_id", "path", "label", "split"]].to_csv(tmp_path / "m.csv", index=False)
    shutil.copytree(root / "tiles", tmp_path / "tiles")
    return read_manifest(tmp_path / "m.csv"), tmp_path / "tiles"


def test_end_to_end_layout_and_values(cohort, tmp_path) -> None:
    root, manifest = cohort
    enc = _encoder()
    report = embed_manifest(manifest, root / "tiles", tmp_path / "f", enc, _cfg())
    assert report.n_ok == 3 and report.n_failed == 0 and report.n_skipped == 0
    assert enc.training  # the caller's module comes back in the mode it was in
    status = pd.read_csv(tmp_path / "f" / "status.csv")
    assert list(status["status"]) == ["ok"] * 3 and (status["n_patches"] > 0).all()
    sid = manifest.slides["slide_id"][0]
    tiles = read_tiles(root / "tiles" / f"{sid}.h5")
    with h5py.File(tmp_path / "f" / f"{sid}.h5", "r") as h5:
        assert h5["features"].shape == (len(tiles.coords), 128) and h5["features"].dtype == np.float32
        assert h5["features"].chunks == (min(1024, len(tiles.coords)), 128)
        assert h5["coords"].dtype == np.int64
        attrs = dict(h5.attrs)
    assert attrs["encoder_name"] == "tiny_cnn" and attrs["encoder_digest"] == enc.digest()
    assert attrs["slide_id"] == sid and attrs["slide_digest"] == tiles.slide_digest
    assert attrs["patch_size"] == 128 and attrs["target_mpp"] == 1.0 and tiles.read_size == 256
    assert {"tiles_digest", "settings_digest"} <= set(attrs)
    # The stored features are the encoder applied to exactly these patches.
    bag = read_features(tmp_path / "f" / f"{sid}.h5")
    np.testing.assert_array_equal(bag.coords, tiles.coords)
    patches = PatchReader(manifest.slides["path"][0], tiles).read(tiles.coords)
    with torch.no_grad():
        expected = enc.eval()(torch.from_numpy(patches)).numpy()
    np.testing.assert_allclose(bag.features, expected, rtol=1e-4, atol=1e-5)


def test_resume_skips_and_encoder_change_redoes(cohort, tmp_path) -> None:
    root, manifest = cohort
    out = tmp_path / "f"
    embed_manifest(manifest, root / "tiles", out, _encoder(), _cfg())
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    # Same encoder (rebuilt: same seed, same digest), other batch size and workers: nothing recomputed.
    again = embed_manifest(manifest, root / "tiles", out, _encoder(), _cfg(batch_size=7))
    assert again.n_skipped == 3 and again.n_embedded_patches == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == mtimes
    first = str(manifest.slides["slide_id"][0])
    changed = embed_manifest(manifest, root / "tiles", out, _encoder(seed=1), _cfg(), slide_ids=[first])
    assert changed.n_skipped == 0 and changed.n_ok == 1
    assert read_features(out / f"{first}.h5").attrs["encoder_digest"] == _encoder(seed=1).digest()


def test_workers_match_main_process(cohort, tmp_path) -> None:
    root, manifest = cohort
    enc = _encoder()
    embed_manifest(manifest, root / "tiles", tmp_path / "w0", enc, _cfg(num_workers=0))
    embed_manifest(manifest, root / "tiles", tmp_path / "w2", enc, _cfg(num_workers=2, prefetch_factor=2))
    for p in (tmp_path / "w0").glob("*.h5"):
        a, b = read_features(p), read_features(tmp_path / "w2" / p.name)
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)


def _corrupt_middle_patch(manifest, tiles_dir) -> tuple[str, tuple[int, int]]:
    row = manifest.slides.iloc[1]
    tiles = read_tiles(tiles_dir / f"{row['slide_id']}.h5")
    x, y = (int(v) for v in tiles.coords[len(tiles.coords) // 2])
    per_row = -(-1536 // 256)
    tile_xy = corrupt_tile(row["path"], level=0, tile_index=(y // 256) * per_row + x // 256)
    assert tile_xy == (x // 256 * 256, y // 256 * 256)
    # A slide corrupt before tiling: the mask comes from a coarser level, so the grid is the same as before.
    cfg = TilingConfig(patch_size=128, target_mpp=1.0)
    tile_slide(str(row["slide_id"]), row["path"], tiles_dir / f"{row['slide_id']}.h5", cfg)
    np.testing.assert_array_equal(read_tiles(tiles_dir / f"{row['slide_id']}.h5").coords, tiles.coords)
    return str(row["slide_id"]), (x, y)


def test_corrupt_tile_fails_that_slide_only(cohort, tmp_path) -> None:
    manifest, tiles_dir = _copy_cohort(cohort, tmp_path)
    bad, _ = _corrupt_middle_patch(manifest, tiles_dir)
    cfg = _cfg(batch_size=8, max_failed_fraction=0.5)
    report = embed_manifest(manifest, tiles_dir, tmp_path / "f", _encoder(), cfg)
    assert report.n_ok == 2 and report.n_failed == 1
    why = report.failures[bad]
    assert (
        bad in why and "unreadable after reopening" in why and "x=" in why and "on_corrupt_patch=skip" in why
    )
    assert not (tmp_path / "f" / f"{bad}.h5").exists()  # nothing half-written
    status = pd.read_csv(tmp_path / "f" / "status.csv").set_index("slide_id")
    assert status.loc[bad, "status"] == "error" and "unreadable" in status.loc[bad, "error"]
    # Past the failure fraction the stage raises, after writing the status table.
    (tmp_path / "f2").mkdir()
    with pytest.raises(StageFailed, match=bad):
        embed_manifest(manifest, tiles_dir, tmp_path / "f2", _encoder(), _cfg(max_failed_fraction=0.0))
    assert (tmp_path / "f2" / "status.csv").is_file()


def test_corrupt_tile_skip_mode_records_patches(cohort, tmp_path) -> None:
    manifest, tiles_dir = _copy_cohort(cohort, tmp_path)
    bad, (x, y) = _corrupt_middle_patch(manifest, tiles_dir)
    n_tiles = len(read_tiles(tiles_dir / f"{bad}.h5").coords)
    cfg = _cfg(on_corrupt_patch="skip", max_corrupt_fraction=0.2, num_workers=2)
    report = embed_manifest(manifest, tiles_dir, tmp_path / "f", _encoder(), cfg)
    assert report.n_failed == 0
    row = report.status.set_index("slide_id").loc[bad]
    assert row["n_corrupt"] == 1 and row["n_patches"] == n_tiles - 1  # 256-px patches on 256-px tiles
    bag = read_features(tmp_path / "f" / f"{bad}.h5")
    assert len(bag) == n_tiles - row["n_corrupt"] and bag.attrs["n_corrupt"] == row["n_corrupt"]
    assert [x, y] in np.asarray(bag.attrs["corrupt_coords"]).tolist()
    assert [x, y] not in bag.coords.tolist()
    # Too many corrupt patches still fails the slide.
    strict = _cfg(on_corrupt_patch="skip", max_corrupt_fraction=0.0, max_failed_fraction=1.0)
    report = embed_manifest(manifest, tiles_dir, tmp_path / "g", _encoder(), strict)
    assert "max_corrupt_fraction" in report.failures[bad]


def test_bad_slides_are_recorded(cohort, tmp_path) -> None:
    manifest, tiles_dir = _copy_cohort(cohort, tmp_path)
    ids = list(manifest.slides["slide_id"])
    manifest.slides.loc[0, "path"] = str(tmp_path / "gone.tiff")
    tiles_copy = tiles_dir  # already a private copy
    (tiles_copy / f"{ids[1]}.h5").unlink()
    cfg = _cfg(max_failed_fraction=1.0)
    report = embed_manifest(
        manifest, tiles_copy, tmp_path / "f", _encoder(), cfg, slide_ids=[*ids, "nope"], shard=3
    )
    assert report.status_path.name == "status-3.csv"
    assert "file not found" in report.failures[ids[0]]
    assert "run `icmil tile` first" in report.failures[ids[1]]
    assert "not in the manifest" in report.failures["nope"]
    assert report.n_ok == 1 and (tmp_path / "f" / f"{ids[2]}.h5").is_file()
