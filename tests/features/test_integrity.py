"""Finished outputs are trusted only when intact: checksums in tiles and features files, temp files of killed
writers cleaned up, and a slide that changed after tiling never embedded with the old grid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pandas as pd
import pytest

from icmil.cli import main
from icmil.config import EmbedConfig, EncoderConfig, SynthConfig, TilingConfig
from icmil.errors import FeatureStoreError
from icmil.features import create_encoder, embed_manifest
from icmil.features.store import read_features, verify_features
from icmil.io import remove_stale_temp_files
from icmil.manifest import read_manifest
from icmil.mil.data import BagStore
from icmil.slides import read_tiles, synthesize_cohort, tile_manifest

TILING = TilingConfig(patch_size=128, target_mpp=1.0)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    synthesize_cohort(root / "synth", SynthConfig(n_slides=3, width=1536, height=1024, seed=0))
    return root / "synth"


@pytest.fixture()
def cohort(source: Path, tmp_path: Path) -> Path:
    """A private copy of the 3-slide cohort (tests damage it); returns its manifest."""
    shutil.copytree(source, tmp_path / "synth")
    return tmp_path / "synth" / "manifest.csv"


def _encoder():  # type: ignore[no-untyped-def]
    return create_encoder(EncoderConfig(name="tiny_cnn"), quiet_random=True)


def _flip_byte_in(path: Path, dataset: str) -> None:
    """Flip one byte inside the stored data of ``dataset`` (not its metadata): what bit rot looks like."""
    with h5py.File(path, "r") as h5:
        ds = h5[dataset]
        offset = ds.id.get_chunk_info(0).byte_offset if ds.chunks else ds.id.get_offset()
        size = ds.id.get_storage_size()
    with path.open("r+b") as fh:
        fh.seek(offset + size // 2)
        byte = fh.read(1)
        fh.seek(offset + size // 2)
        fh.write(bytes([byte[0] ^ 0x5A]))


def test_a_features_file_with_flipped_bytes_is_embedded_again(cohort: Path, tmp_path: Path) -> None:
    manifest = read_manifest(cohort)
    tile_manifest(manifest, tmp_path / "tiles", TILING)
    cfg = EmbedConfig(batch_size=32, num_workers=0)
    out = tmp_path / "features"
    first = embed_manifest(manifest, tmp_path / "tiles", out, _encoder(), cfg)
    assert first.n_ok == 3
    for p in out.glob("*.h5"):
        verify_features(p)  # every finished file carries a checksum that matches
    victim = out / "slide_001.h5"
    _flip_byte_in(victim, "features")
    with pytest.raises(FeatureStoreError, match="is corrupt"):
        verify_features(victim)
    with pytest.raises(FeatureStoreError, match=r"is corrupt.*icmil embed"):
        read_features(victim)  # what training, evaluation and stage 2 read through
    with pytest.raises(FeatureStoreError, match=r"slide_001.*is corrupt"):
        BagStore(out).load("slide_001")  # the bag head's reader: verified on its first read
    again = embed_manifest(manifest, tmp_path / "tiles", out, _encoder(), cfg)
    assert again.n_skipped == 2  # the two intact files are reused...
    assert not again.status.set_index("slide_id").loc["slide_001", "skipped"]  # ...the corrupt one is not
    verify_features(victim)
    # A file with no checksum (made elsewhere, or edited) cannot be vouched for either.
    with h5py.File(victim, "r+") as h5:
        del h5.attrs["content_sha256"]
    with pytest.raises(FeatureStoreError, match="no content checksum"):
        verify_features(victim)
    assert embed_manifest(manifest, tmp_path / "tiles", out, _encoder(), cfg).n_skipped == 2


def test_a_tiles_file_with_flipped_bytes_is_tiled_again(cohort: Path, tmp_path: Path) -> None:
    manifest = read_manifest(cohort)
    tile_manifest(manifest, tmp_path / "tiles", TILING)
    victim = tmp_path / "tiles" / "slide_002.h5"
    good = read_tiles(victim)
    _flip_byte_in(victim, "coords")
    with pytest.raises(FeatureStoreError, match="is corrupt: its content does not match the checksum"):
        read_tiles(victim)
    report = tile_manifest(manifest, tmp_path / "tiles", TILING)
    skipped = report.status.set_index("slide_id")["skipped"]
    assert not skipped["slide_002"] and skipped["slide_000"] and skipped["slide_001"]
    assert (read_tiles(victim).coords == good.coords).all()


_WRITER = """
import os, signal, sys, time
from pathlib import Path
from icmil.io import atomic_path
with atomic_path(Path(sys.argv[1]) / "slide_000.h5", suffix=".h5") as tmp:
    tmp.write_bytes(b"half a file")
    print(tmp, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-write: no cleanup code runs
    time.sleep(120)
"""


def _start_writer(folder: Path, mode: str) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(folder), mode], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_temp_files_of_killed_writers_are_removed_and_live_ones_kept(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "features"
    out.mkdir()
    killed, dead_tmp = _start_writer(out, "kill")
    assert killed.wait(timeout=60) == -signal.SIGKILL
    alive, live_tmp = _start_writer(out, "sleep")
    try:
        assert dead_tmp.is_file() and live_tmp.is_file() and dead_tmp.name.startswith(".slide_000.h5.tmp-")
        (out / ".notes").write_text("a user's hidden file")  # not ours: never touched
        manifest = read_manifest(cohort)
        tile_manifest(manifest, tmp_path / "tiles", TILING)
        report = embed_manifest(
            manifest, tmp_path / "tiles", out, _encoder(), EmbedConfig(batch_size=32, num_workers=0)
        )
        assert report.n_ok == 3
        assert not dead_tmp.exists()  # the killed run's leftover is gone
        assert live_tmp.is_file()  # a run still writing keeps its file
        assert (out / ".notes").is_file()
        assert remove_stale_temp_files(out) == []
    finally:
        alive.kill()
        alive.wait(timeout=60)
    assert remove_stale_temp_files(out) == [live_tmp]  # once its writer is gone, it is stale too


def test_a_slide_changed_after_tiling_is_refused_by_name_then_retiled(
    cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiles, feats = tmp_path / "tiles", tmp_path / "features"
    common = ["--set", "encoder.name=tiny_cnn", "--set", "embed.num_workers=0", "--set", "val_fraction=0"]
    tiling = ["--set", "tiling.patch_size=128", "--set", "tiling.target_mpp=1.0"]
    assert main(["tile", "--manifest", str(cohort), "--out", str(tiles), *tiling]) == 0
    slides = cohort.parent / "slides"
    time.sleep(0.01)
    shutil.copyfile(slides / "slide_002.tiff", slides / "slide_001.tiff")  # the slide is replaced
    relaxed = ["--set", "embed.max_failed_fraction=0.5"]
    assert (
        main(
            [
                "embed",
                "--manifest",
                str(cohort),
                "--tiles",
                str(tiles),
                "--out",
                str(feats),
                *common,
                *relaxed,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2 embedded" in out and "1 failed" in out
    status = pd.read_csv(feats / "status.csv").set_index("slide_id")
    why = status.loc["slide_001", "error"]
    assert (
        "slide 'slide_001'" in why and "changed after it was tiled" in why and "run `icmil tile` again" in why
    )
    assert not (feats / "slide_001.h5").exists()
    # What the message says to do works: tiling again re-tiles just that slide, then embedding succeeds.
    assert main(["tile", "--manifest", str(cohort), "--out", str(tiles), *tiling]) == 0
    assert "2 already up to date" in capsys.readouterr().out
    assert (
        main(["embed", "--manifest", str(cohort), "--tiles", str(tiles), "--out", str(feats), *common]) == 0
    )
    assert "1 embedded, 2 up to date, 0 failed" in capsys.readouterr().out
    assert os.path.isfile(feats / "slide_001.h5")
