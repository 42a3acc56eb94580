"""PatchReader: batched reads equal single reads, resizing, edges, corrupt tiles; loaders and random access."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import torch

from icmil.errors import SlideError
from icmil.slides.patches import (
    MultiSlideReader,
    PatchReader,
    SlideSource,
    all_pairs,
    patch_loader,
    patch_pair_loader,
)
from tests.features.helpers import FakeTiles, corrupt_tiff_tile, grid, write_pyramid


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_pyramid(tmp_path_factory.mktemp("patches") / "a.tiff", 1536, 1024, seed=1)


def test_read_matches_openslide_and_merging(slide) -> None:
    coords = grid(1536, 1024, 256)
    tiles = FakeTiles(coords, read_level=0, read_size=256, patch_size=256)
    merged = PatchReader(slide, tiles, merge_reads=8).read(coords)
    single = PatchReader(slide, tiles, merge_reads=1).read(coords)
    assert merged.shape == (len(coords), 3, 256, 256) and merged.dtype == np.uint8
    np.testing.assert_array_equal(merged, single)
    ref = np.asarray(openslide.OpenSlide(str(slide)).read_region((512, 256), 0, (256, 256)))[..., :3]
    i = int(np.flatnonzero((coords == (512, 256)).all(1))[0])
    np.testing.assert_array_equal(merged[i].transpose(1, 2, 0), ref)
    # Column order merges vertically and gives the same patches.
    col = coords[np.lexsort((coords[:, 1], coords[:, 0]))]
    np.testing.assert_array_equal(
        PatchReader(slide, tiles).read(col), PatchReader(slide, tiles, merge_reads=1).read(col)
    )
    # torch.from_numpy gives a channels_last batch without a copy.
    assert torch.from_numpy(merged).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("level", "read_size", "patch_size", "step"), [(1, 256, 224, 512), (0, 512, 256, 512)]
)
def test_resize_and_levels(slide, level: int, read_size: int, patch_size: int, step: int) -> None:
    tiles = FakeTiles(grid(1536, 1024, step), read_level=level, read_size=read_size, patch_size=patch_size)
    out = PatchReader(slide, tiles).read(tiles.coords)
    assert out.shape == (len(tiles.coords), 3, patch_size, patch_size)
    np.testing.assert_array_equal(out, PatchReader(slide, tiles, merge_reads=1).read(tiles.coords))


def test_outside_the_slide_is_white(slide) -> None:
    tiles = FakeTiles(np.array([[1400, 900]]), 0, 256, 256)
    patch = PatchReader(slide, tiles).read(tiles.coords)[0]
    assert (patch[:, -1, -1] == 255).all() and (patch[:, 0, 0] < 255).any()


def test_corrupt_tile_reopens_and_names_the_patch(tmp_path) -> None:
    path = write_pyramid(tmp_path / "c.tiff", 1536, 1024, seed=2)
    coords = grid(1536, 1024, 256)
    good = PatchReader(path, FakeTiles(coords, 0, 256, 256)).read(coords)
    corrupt_tiff_tile(path, page=0, tile_index=7)  # 6 tiles per row: tile 7 is the one at (256, 256)
    reader = PatchReader(path, FakeTiles(coords, 0, 256, 256), slide_id="c")
    with pytest.raises(SlideError, match=r"'c'.*x=256, y=256.*unreadable after reopening"):
        reader.read(coords)
    assert reader.reopens >= 1
    # The handle was reopened: patches after the corrupt one still read (a broken handle would fail them all).
    np.testing.assert_array_equal(reader.read(coords[8:]), good[8:])
    patches, ok = reader.read_checked(coords)
    assert ok.sum() == len(coords) - 1 and not ok[7]
    assert reader.corrupt[-1][:2] == (256, 256) and "Decoding error" in reader.corrupt[-1][2]
    np.testing.assert_array_equal(patches[ok], good[ok])


def test_missing_slide_is_a_slide_error(tmp_path) -> None:
    reader = PatchReader(tmp_path / "gone.tiff", FakeTiles(np.zeros((1, 2), np.int64), 0, 256, 256), "gone")
    with pytest.raises(SlideError, match=r"'gone'.*not found"):
        reader.read(np.zeros((1, 2), np.int64))
    bad = FakeTiles(np.zeros((1, 2), np.int64), 5, 256, 256)
    with pytest.raises(SlideError, match="read level 5 but the slide has 2"):
        PatchReader(write_pyramid(tmp_path / "l.tiff", 512, 512), bad).read(bad.coords)


def test_loader_workers_match_main_process(slide) -> None:
    coords = grid(1536, 1024, 256)
    sources = [
        SlideSource("a", str(slide), FakeTiles(coords, 0, 256, 256)),
        SlideSource("b", str(slide), FakeTiles(coords[::-1].copy(), 0, 256, 256)),
    ]
    runs = []
    for workers in (0, 2):
        items = list(patch_loader(sources, batch_size=5, num_workers=workers, prefetch_factor=2))
        assert [(i["slide"], i["start"]) for i in items] == [(s, a) for s in (0, 1) for a in range(0, 24, 5)]
        runs.append(torch.cat([i["patches"] for i in items]))
        assert all(i["error"] == "" and bool(i["ok"].all()) for i in items)
    assert torch.equal(runs[0], runs[1])
    ref = PatchReader(slide, sources[0].tiles).read(coords)
    np.testing.assert_array_equal(runs[0][:24].permute(0, 3, 1, 2).numpy(), ref)


def test_loader_reports_errors_per_slide(tmp_path, slide) -> None:
    coords = grid(1536, 1024, 256)
    sources = [
        SlideSource("gone", str(tmp_path / "gone.tiff"), FakeTiles(coords, 0, 256, 256)),
        SlideSource("a", str(slide), FakeTiles(coords, 0, 256, 256)),
    ]
    items = list(patch_loader(sources, batch_size=12, num_workers=0))
    assert ["not found" in i["error"] for i in items] == [True, True, False, False]


def test_random_access(slide) -> None:
    coords = grid(1536, 1024, 256)
    sources = [
        SlideSource("a", str(slide), FakeTiles(coords, 0, 256, 256)),
        SlideSource("b", str(slide), FakeTiles(coords[:4], 1, 128, 64)),
    ]
    ref = PatchReader(slide, sources[0].tiles).read(coords)
    multi = MultiSlideReader(sources, max_open=1)
    got = multi.read_pairs([("a", 5), (0, 2), ("a", 23)])
    np.testing.assert_array_equal(got, ref[[5, 2, 23]])
    pairs = all_pairs(sources[:1])
    assert pairs.shape == (24, 2)
    batches = list(patch_pair_loader(sources[:1], pairs, batch_size=10, num_workers=0, seed=3))
    x, _, patch_idx = batches[0]
    assert x.shape == (10, 3, 256, 256) and x.dtype == torch.uint8
    np.testing.assert_array_equal(x.numpy(), ref[patch_idx.numpy()])
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(24))
