"""Feature store layout (chunks, dtypes, attrs), atomic writes, CLAM/TRIDENT files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from icmil.errors import FeatureStoreError
from icmil.features import FeatureWriter, read_features, write_features

ATTRS = {
    "encoder_name": "tiny_cnn",
    "encoder_digest": "e1",
    "slide_id": "s1",
    "slide_digest": "d1",
    "tiles_digest": "t1",
    "patch_size": 256,
    "target_mpp": 0.5,
    "settings_digest": "x1",
}


@pytest.mark.parametrize("n", [3, 2500])
def test_layout(tmp_path, n: int) -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, 16)).astype(np.float64)  # converted to float32 on write
    coords = rng.integers(0, 10_000, size=(n, 2)).astype(np.int32)
    path = write_features(tmp_path / "s1.h5", feats, coords, ATTRS)
    with h5py.File(path, "r") as h5:
        assert h5["features"].dtype == np.float32 and h5["features"].shape == (n, 16)
        assert h5["features"].chunks == (min(1024, n), 16)
        assert h5["coords"].dtype == np.int64 and h5["coords"].shape == (n, 2)
        for key, value in ATTRS.items():
            assert h5.attrs[key] == value
    bag = read_features(path)
    np.testing.assert_allclose(bag.features, feats.astype(np.float32))
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.attrs["encoder_digest"] == "e1" and bag.slide_id == "s1" and len(bag) == n
    assert [p.name for p in tmp_path.iterdir()] == ["s1.h5"]  # no temp files left behind


def test_failed_write_leaves_old_file(tmp_path) -> None:
    path = write_features(tmp_path / "s1.h5", np.ones((2, 4)), np.zeros((2, 2)), ATTRS)
    with pytest.raises(RuntimeError), FeatureWriter(path, 4, 4, ATTRS) as w:
        w.append(np.zeros((2, 4)), np.zeros((2, 2)))
        raise RuntimeError("killed mid-slide")
    assert read_features(path).features.tolist() == [[1.0] * 4] * 2
    assert [p.name for p in tmp_path.iterdir()] == ["s1.h5"]


def test_writer_trims_skipped_rows(tmp_path) -> None:
    w = FeatureWriter(tmp_path / "s.h5", n_max=5, dim=3, attrs=ATTRS)
    w.append(np.ones((3, 3)), np.arange(6).reshape(3, 2))
    w.commit({"n_corrupt": 2})
    bag = read_features(tmp_path / "s.h5")
    assert bag.features.shape == (3, 3) and bag.attrs["n_corrupt"] == 2
    with pytest.raises(FeatureStoreError, match="more rows"):
        FeatureWriter(tmp_path / "t.h5", 1, 3, ATTRS).append(np.ones((2, 3)), np.zeros((2, 2)))


def test_bad_shapes(tmp_path) -> None:
    with pytest.raises(FeatureStoreError, match="same N"):
        write_features(tmp_path / "x.h5", np.ones((3, 4)), np.zeros((2, 2)), ATTRS)


def test_reads_clam_and_trident_files(tmp_path) -> None:
    # CLAM: features (N, D) + coords with patch_level/patch_size on the coords dataset, no file attrs.
    with h5py.File(tmp_path / "clam_slide.h5", "w") as h5:
        h5["features"] = np.ones((5, 1024), np.float32)
        h5["coords"] = np.arange(10).reshape(5, 2)
        h5["coords"].attrs["patch_level"] = 0
        h5["coords"].attrs["patch_size"] = 256
    bag = read_features(tmp_path / "clam_slide.h5")
    assert bag.features.shape == (5, 1024) and bag.coords.dtype == np.int64
    assert bag.slide_id == "clam_slide" and bag.attrs["patch_size"] == 256
    # TRIDENT-style leading batch axis and byte-string attrs.
    with h5py.File(tmp_path / "trident.h5", "w") as h5:
        h5["features"] = np.ones((1, 4, 8), np.float32)
        h5["coords"] = np.zeros((1, 4, 2), np.int32)
        h5.attrs["encoder"] = np.bytes_(b"conch_v15")
    bag = read_features(tmp_path / "trident.h5")
    assert bag.features.shape == (4, 8) and bag.coords.shape == (4, 2) and bag.attrs["encoder"] == "conch_v15"


def test_read_errors(tmp_path) -> None:
    with pytest.raises(FeatureStoreError, match="not found"):
        read_features(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(FeatureStoreError, match="not a readable HDF5"):
        read_features(tmp_path / "text.h5")
    with h5py.File(tmp_path / "nofeat.h5", "w") as h5:
        h5["coords"] = np.zeros((2, 2))
    with pytest.raises(FeatureStoreError, match="no 'features'"):
        read_features(tmp_path / "nofeat.h5")


def test_empty_bag(tmp_path) -> None:
    path = write_features(tmp_path / "e.h5", np.zeros((0, 8)), np.zeros((0, 2)), ATTRS)
    bag = read_features(path)
    assert bag.features.shape == (0, 8) and bag.coords.shape == (0, 2)
