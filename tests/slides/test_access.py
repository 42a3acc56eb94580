"""Slide access: µm/px from metadata, s3:// slides through a real S3 server (SeaweedFS), cache reuse."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from icmil.config import SynthConfig
from icmil.errors import SlideError
from icmil.manifest import read_manifest
from icmil.slides import localize, read_tiles, slide_digest, slide_mpp, tile_manifest, write_synthetic_slide
from icmil.slides.access import _etag_matches, split_s3_uri

from .conftest import small_tiling


class FakeSlide:
    def __init__(self, **props: str) -> None:
        self.properties = props


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        ({"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2527"}, 0.2527),  # vendor metadata (Aperio...)
        ({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}, 0.25),
        ({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}, 0.25),
        # A bogus openslide mpp (from 72 dpi) falls through to the tags, which are just as bogus: error.
        ({"openslide.mpp-x": "352.7777", "tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}, None),
        ({"tiff.XResolution": "28.346457", "tiff.ResolutionUnit": "centimeter"}, None),  # 72 dpi in cm
        ({"tiff.XResolution": "1", "tiff.ResolutionUnit": "none"}, None),
        ({}, None),
    ],
)
def test_slide_mpp_from_metadata(props: dict[str, str], expected: float | None) -> None:
    slide = FakeSlide(**props)
    if expected is None:
        with pytest.raises(SlideError, match="add an `mpp` column"):
            slide_mpp(slide, "s1", None)  # type: ignore[arg-type]
    else:
        assert slide_mpp(slide, "s1", None) == pytest.approx(expected)  # type: ignore[arg-type]
    # The manifest's value always wins; NaN (an empty cell) does not.
    assert slide_mpp(slide, "s1", 0.5) == 0.5  # type: ignore[arg-type]
    if expected is not None:
        assert slide_mpp(slide, "s1", float("nan")) == pytest.approx(expected)  # type: ignore[arg-type]


def test_localize_local_and_uri_parsing(tmp_path: Path) -> None:
    f = tmp_path / "a.svs"
    f.write_bytes(b"x")
    assert localize(str(f), None) == f
    with pytest.raises(SlideError, match="file not found"):
        localize(str(tmp_path / "b.svs"), None, "b")
    assert split_s3_uri("s3://bucket/a/b/c.svs") == ("bucket", "a/b/c.svs")
    with pytest.raises(ValueError):
        split_s3_uri("s3://bucket-only")


def test_s3_keys_cannot_escape_the_cache(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="would leave the cache folder"):
        localize("s3://bucket/../../outside.svs", tmp_path / "cache", "x")


def test_slide_digest_samples_big_files(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (40 << 20))
    d0 = slide_digest(big)
    with big.open("r+b") as fh:  # a change in a sampled block (the tail) changes the digest
        fh.seek((40 << 20) - 10)
        fh.write(b"changed")
    assert slide_digest(big) != d0


def test_multipart_etag_is_verified(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "f.bin"
    data = bytes(range(256)) * (40_000)  # ~10 MB: two 8-MiB parts
    f.write_bytes(data)
    parts = [hashlib.md5(data[i : i + (8 << 20)]).digest() for i in range(0, len(data), 8 << 20)]
    etag = hashlib.md5(b"".join(parts)).hexdigest() + "-2"
    assert _etag_matches(f, etag) is True
    assert _etag_matches(f, hashlib.md5(data).hexdigest()) is True
    assert _etag_matches(f, "0" * 32) is False
    assert _etag_matches(f, "0" * 32 + "-7") is None  # part size unknown: cannot check, not a mismatch


@pytest.mark.servers
def test_s3_slide_is_downloaded_verified_cached_and_tiled(
    s3_server, cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_server.apply_env(monkeypatch)
    client = s3_server.client()
    bucket = s3_server.ensure_bucket("icmil-slides")
    local = cohort.parent / "slides" / "slide_001.tiff"
    client.upload_file(str(local), bucket, "cohort/slide_001.tiff")
    uri = f"s3://{bucket}/cohort/slide_001.tiff"
    cache = tmp_path / "cache"

    path = localize(uri, cache, "s1")
    assert path == cache / bucket / "cohort" / "slide_001.tiff"
    assert path.read_bytes() == local.read_bytes()
    # Second call: the cached copy matches the object's ETag and size, so it is reused as it is.
    inode, mtime = path.stat().st_ino, path.stat().st_mtime_ns
    assert localize(uri, cache, "s1") == path
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime)
    # A damaged cached copy (size differs) is replaced.
    path.write_bytes(b"partial")
    assert localize(uri, cache, "s1").read_bytes() == local.read_bytes()
    # The object is replaced: the cache notices (new ETag) and downloads again.
    other = tmp_path / "other.tiff"
    write_synthetic_slide(other, SynthConfig(), seed=8, positive=False, width=1024, height=768)
    client.upload_file(str(other), bucket, "cohort/slide_001.tiff")
    assert localize(uri, cache, "s1").read_bytes() == other.read_bytes()

    # Tiling an s3:// manifest row: tiles record the manifest path and the digest of the bytes.
    csv = tmp_path / "m.csv"
    csv.write_text(f"slide_id,path,label\nremote,{uri},normal\nmissing,s3://{bucket}/nope.tiff,tumor\n")
    report = tile_manifest(read_manifest(csv), tmp_path / "tiles", small_tiling(), cache_dir=cache)
    status = report.status.set_index("slide_id")
    assert status.loc["remote", "status"] == "ok"
    tiles = read_tiles(tmp_path / "tiles" / "remote.h5")
    assert tiles.slide_path == uri and tiles.slide_digest == slide_digest(other)
    assert status.loc["missing", "status"] == "error"
    assert f"S3 object not found: s3://{bucket}/nope.tiff" in status.loc["missing", "error"]


@pytest.mark.servers
def test_s3_errors_name_the_uri_and_the_cause(
    s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_server.apply_env(monkeypatch)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(SlideError, match=r"S3 bucket does not exist: s3://no-such-bucket-xyz/a\.svs"):
        localize("s3://no-such-bucket-xyz/a.svs", tmp_path, "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(SlideError, match=r"access denied .*AWS_SECRET_ACCESS_KEY"):
        localize(f"s3://{s3_server.bucket}/a.svs", tmp_path, "a")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    with pytest.raises(SlideError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}"):
        localize(f"s3://{s3_server.bucket}/a.svs", tmp_path, "a")
