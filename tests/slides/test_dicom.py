"""A folder of DICOM-WSI files is one slide in a manifest: it tiles and embeds exactly like its source slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from icmil.cohort import slide_fingerprint
from icmil.config import EmbedConfig, EncoderConfig
from icmil.errors import SlideError
from icmil.features import create_encoder, embed_manifest, read_features
from icmil.manifest import read_manifest
from icmil.slides import open_slide, read_tiles, slide_digest, slide_mpp, tile_manifest

from .conftest import small_tiling
from .dicom_wsi import dicom_copy, write_level


@pytest.fixture(scope="module")
def dicom_slide(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source TIFF, DICOM-WSI folder with the same pixels and µm/px)."""
    source = cohort.parent / "slides" / "slide_000.tiff"
    return source, dicom_copy(source, tmp_path_factory.mktemp("dicom") / "slide_000_dicom", mpp=0.5)


def test_dicom_folder_tiles_and_embeds_like_its_source(
    dicom_slide: tuple[Path, Path], tmp_path: Path
) -> None:
    source, folder = dicom_slide
    assert sorted(p.name for p in folder.iterdir()) == ["level-0.dcm", "level-1.dcm"]
    slide = open_slide(folder, "dcm")
    assert slide.properties["openslide.vendor"] == "dicom" and slide_mpp(slide, "dcm", None) == 0.5
    slide.close()

    csv = tmp_path / "m.csv"
    csv.write_text(f"slide_id,path,label\ntiff,{source},tumor\ndcm,{folder},tumor\n")
    manifest = read_manifest(csv, val_fraction=0, test_fraction=0)
    report = tile_manifest(manifest, tmp_path / "tiles", small_tiling())
    assert report.n_ok == 2, report.failures
    a, b = read_tiles(tmp_path / "tiles" / "tiff.h5"), read_tiles(tmp_path / "tiles" / "dcm.h5")
    np.testing.assert_array_equal(a.coords, b.coords)
    assert len(b.coords) > 0 and b.slide_digest == slide_digest(folder)

    encoder = create_encoder(EncoderConfig(name="tiny_cnn"), quiet_random=True)
    cfg = EmbedConfig(batch_size=32, num_workers=0)
    embedded = embed_manifest(manifest, tmp_path / "tiles", tmp_path / "features", encoder, cfg)
    assert embedded.n_ok == 2, embedded.failures
    fa, fb = read_features(tmp_path / "features" / "tiff.h5"), read_features(tmp_path / "features" / "dcm.h5")
    np.testing.assert_allclose(fa.features, fb.features, rtol=1e-5, atol=1e-6)  # the same pixels

    # The folder is one slide for caching: its key covers every file in it.
    assert slide_fingerprint(str(folder)).startswith("sha256-dir:")


def test_a_changed_file_in_the_folder_changes_the_slide(
    dicom_slide: tuple[Path, Path], tmp_path: Path
) -> None:
    import shutil

    folder = shutil.copytree(dicom_slide[1], tmp_path / "copy")
    before = slide_digest(folder)
    (folder / "level-1.dcm").write_bytes((folder / "level-1.dcm").read_bytes() + b"\0")
    after = slide_digest(folder)
    assert after != before
    (folder / ".DS_Store").write_bytes(b"finder")  # hidden files are not part of the slide
    assert slide_digest(folder) == after


def test_folders_without_a_readable_dicom_wsi_are_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlideError, match="is a directory with no DICOM file in it"):
        open_slide(empty, "e")
    other = tmp_path / "not_wsi"
    other.mkdir()
    secondary_capture = "1.2.840.10008.5.1.4.1.1.7"
    rgb = np.zeros((256, 256, 3), np.uint8)
    uid = generate_uid()
    write_level(
        other / "x.dcm", rgb, mpp=0.5, series=uid, study=uid, base_level=True, sop_class=secondary_capture
    )
    with pytest.raises(SlideError, match="none is a whole-slide image"):
        open_slide(other, "o")
