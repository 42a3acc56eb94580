"""Every kind of bad slide gets its own clear, per-slide error while the good slides are tiled."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest

from icmil.config import SynthConfig
from icmil.errors import SlideError
from icmil.manifest import read_manifest
from icmil.slides import corrupt_tile, open_slide, tile_manifest, write_synthetic_slide

from .conftest import small_tiling

SMALL = {"width": 1024, "height": 768}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def bad_cohort(cohort: Path, tmp_path: Path) -> Path:
    good = cohort.parent / "slides" / "slide_000.tiff"
    d = tmp_path / "slides"
    d.mkdir()
    (d / "notes.txt").write_text("slide_id,path,label\nthis is not a slide\n")
    (d / "empty.svs").write_bytes(b"")
    (d / "folder.svs").mkdir()
    data = good.read_bytes()
    (d / "truncated.tiff").write_bytes(data[: len(data) // 2])
    write_synthetic_slide(d / "nompp.tiff", SynthConfig(), seed=5, positive=False, mpp=0, **SMALL)  # type: ignore[arg-type]
    shutil.copy(d / "nompp.tiff", d / "nompp_fixed.tiff")
    write_synthetic_slide(d / "blank.tiff", SynthConfig(), seed=5, positive=False, blank=True, **SMALL)  # type: ignore[arg-type]
    # A slide whose thumbnail level has a broken tile: the mask cannot be computed.
    write_synthetic_slide(
        d / "brokenthumb.tiff", SynthConfig(), seed=6, positive=False, width=2048, height=2048
    )
    corrupt_tile(d / "brokenthumb.tiff", level=1, tile_index=0)
    rows = [
        ("good", str(good), "", ""),
        ("missing", str(d / "nope.svs"), "", ""),
        ("text", str(d / "notes.txt"), "", ""),
        ("empty", str(d / "empty.svs"), "", ""),
        ("directory", str(d / "folder.svs"), "", ""),
        ("truncated", str(d / "truncated.tiff"), "", ""),
        ("nompp", str(d / "nompp.tiff"), "", ""),
        ("nompp_fixed", str(d / "nompp_fixed.tiff"), "", "0.5"),
        ("blank", str(d / "blank.tiff"), "", ""),
        ("brokenthumb", str(d / "brokenthumb.tiff"), "", ""),
        ("s3gone", "s3://icmil-nowhere/slides/x.svs", "", ""),
    ]
    df = pd.DataFrame(rows, columns=["slide_id", "path", "label", "mpp"])
    df["label"] = ["normal", "tumor"] * 5 + ["normal"]
    csv = tmp_path / "manifest.csv"
    df.to_csv(csv, index=False)
    return csv


EXPECTED = {
    "missing": "file not found",
    "text": "is a text file, not a slide",
    "empty": "is empty (0 bytes)",
    "directory": "is a directory with no DICOM file in it",
    "truncated": "it is truncated",
    "nompp": "no µm/px in its metadata (add an `mpp` column",
    "blank": "no tissue found",
    "brokenthumb": "reading the thumbnail",
    "s3gone": "cannot reach the S3 endpoint",
}


def test_each_bad_slide_has_its_own_error_and_the_rest_go_on(
    bad_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An S3 endpoint that refuses connections, and no retries, so the test is quick.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    m = read_manifest(bad_cohort)
    report = tile_manifest(
        m, tmp_path / "tiles", small_tiling(max_failed_fraction=1.0), cache_dir=tmp_path / "c"
    )
    status = report.status.set_index("slide_id")
    assert status.loc["good", "status"] == "ok" and status.loc["good", "n_patches"] > 0
    assert status.loc["nompp_fixed", "status"] == "ok"  # the manifest's mpp column rescues it
    for sid, text in EXPECTED.items():
        assert status.loc[sid, "status"] == "error", sid
        assert f"slide {sid!r}" in status.loc[sid, "error"], sid
        assert text in status.loc[sid, "error"], (sid, status.loc[sid, "error"])
    assert "s3://icmil-nowhere/slides/x.svs" in status.loc["s3gone", "error"]
    assert sorted(p.stem for p in (tmp_path / "tiles").glob("*.h5")) == ["good", "nompp_fixed"]
    on_disk = pd.read_csv(report.status_path, keep_default_na=False).set_index("slide_id")
    assert on_disk.loc["truncated", "error"] == status.loc["truncated", "error"]


def test_open_slide_messages_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SlideError) as info:
        open_slide(tmp_path / "x.svs", "s1")
    assert info.value.slide_id == "s1" and str(tmp_path / "x.svs") in info.value.cause
    (tmp_path / "bin.svs").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SlideError, match="not a slide format OpenSlide can read"):
        open_slide(tmp_path / "bin.svs", "s2")
